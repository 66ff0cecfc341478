//! Frames over a byte stream: [`FrameReader`] buffers at most one maximal
//! frame beyond what one read brings (an oversized length prefix is
//! rejected before any body is read), and [`FrameWriter`] gathers frames
//! into few system calls without copying a block's data.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use shoal_core::wire::{self, DecodeError, EncodeError, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes a [`FrameReader`] asks the stream for at first.
const READ_BYTES_MIN: usize = 64 * 1024;
/// Bytes a [`FrameReader`] asks the stream for at most: a read that fills
/// what was asked doubles the next, so a busy connection brings a dozen
/// 16 KiB blocks per system call while an idle one keeps a small buffer.
const READ_BYTES_MAX: usize = 256 * 1024;
/// Below this much free room (or a quarter of the read size) the reader
/// moves to another buffer rather than read a sliver.
const READ_ROOM_BYTES_MIN: usize = 16 * 1024;
/// Earlier read buffers a [`FrameReader`] keeps for reuse. A frame handed
/// out is a slice of a read buffer, which is reused only once every such
/// frame has been dropped; so a busy connection's memory goes round
/// rather than through the allocator (and page faults) for every read.
const READ_BUFFERS_SPARE_MAX: usize = 2;

/// Why reading a frame stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// The stream failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed mid-frame")]
    Truncated,
}

/// Reads frames from a stream. A block's data is a slice of the read
/// buffer, never copied; only a frame split across two buffers is.
pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
    /// Earlier read buffers, some perhaps still shared with frames.
    spare: VecDeque<BytesMut>,
    /// Bytes asked for by the next read.
    read_bytes: usize,
    frame_bytes_max: u32,
    /// Buffers allocated (the first included).
    #[cfg(test)]
    allocations: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader accepting frames up to `frame_bytes_max`.
    pub fn new(reader: R, frame_bytes_max: u32) -> Self {
        Self {
            reader,
            buf: BytesMut::with_capacity(READ_BYTES_MIN),
            spare: VecDeque::new(),
            read_bytes: READ_BYTES_MIN,
            frame_bytes_max,
            #[cfg(test)]
            allocations: 1,
        }
    }

    /// The next message with the wire bytes it took, or `None` at a clean
    /// end of stream.
    pub async fn next(&mut self) -> Result<Option<(Message, usize)>, FrameError> {
        loop {
            let missing = self.missing();
            if missing == 0 {
                let before = self.buf.len();
                if let Some(message) = wire::decode_frame(&mut self.buf, self.frame_bytes_max)? {
                    return Ok(Some((message, before - self.buf.len())));
                }
            }
            self.make_room(missing);
            let room = self.buf.capacity() - self.buf.len();
            let read = self.reader.read_buf(&mut self.buf).await?;
            if read == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated) };
            }
            if read >= room {
                self.read_bytes = (self.read_bytes * 2).min(READ_BYTES_MAX);
            }
        }
    }

    /// Bytes still to come of the frame at the front: zero once it is
    /// whole, or when its length is over the limit (decoding rejects it
    /// before anything more is read).
    fn missing(&self) -> usize {
        let Some(prefix) = self.buf.first_chunk::<{ wire::LENGTH_PREFIX_BYTES }>() else {
            return wire::LENGTH_PREFIX_BYTES - self.buf.len();
        };
        let len = u32::from_be_bytes(*prefix);
        if len > self.frame_bytes_max {
            return 0;
        }
        (wire::LENGTH_PREFIX_BYTES + len as usize).saturating_sub(self.buf.len())
    }

    /// Room for the rest of the frame at the front and a useful read: in
    /// place if no frame still holds the buffer, else in a spare buffer
    /// nobody holds, else in a new one. The partial frame buffered (less
    /// than one frame) is the only thing ever copied.
    fn make_room(&mut self, missing: usize) {
        let room = self.buf.capacity() - self.buf.len();
        let wanted = self.read_bytes.max(missing);
        let useful = READ_ROOM_BYTES_MIN.max(self.read_bytes / 4);
        if room >= missing.max(useful) || self.buf.try_reclaim(wanted) {
            return;
        }
        let mut next = None;
        for _ in 0..self.spare.len() {
            let Some(mut candidate) = self.spare.pop_front() else { break };
            if candidate.try_reclaim(self.buf.len() + wanted) {
                next = Some(candidate);
                break;
            }
            self.spare.push_back(candidate);
        }
        let mut next = match next {
            Some(next) => next,
            None => {
                #[cfg(test)]
                {
                    self.allocations += 1;
                }
                BytesMut::with_capacity(self.buf.len() + wanted)
            }
        };
        next.extend_from_slice(&self.buf);
        let mut old = std::mem::replace(&mut self.buf, next);
        old.clear();
        if self.spare.len() >= READ_BUFFERS_SPARE_MAX {
            // Freed once its last frame is dropped.
            self.spare.pop_front();
        }
        self.spare.push_back(old);
    }
}

/// Writes frames through a buffer of `buffer_bytes`: frames are gathered
/// and go out in one system call when the buffer would overflow or on
/// [`FrameWriter::flush`]. On a stream with vectored writes (tokio TCP) a
/// block's data is not copied into the buffer: it goes out from where it
/// lies, in the same `writev` as the headers around it. On other streams
/// (turmoil's) everything is copied into the buffer, as a
/// [`tokio::io::BufWriter`] would, and the writes are the same size.
pub struct FrameWriter<W> {
    writer: W,
    buffer_bytes: usize,
    vectored: bool,
    /// Parts sealed and waiting to be written, in order.
    parts: Parts,
    /// Small parts being gathered into one; sealed into `parts` before a
    /// part that goes by reference, and on flush.
    staging: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer gathering up to `buffer_bytes` before a system call.
    pub fn new(writer: W, buffer_bytes: usize) -> Self {
        let vectored = writer.is_write_vectored();
        Self { writer, buffer_bytes, vectored, parts: Parts::default(), staging: BytesMut::new() }
    }

    /// Bytes gathered and not yet written.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.parts.remaining() + self.staging.len()
    }

    /// Queue one frame (writing what was gathered first if it would not
    /// fit); returns the frame's bytes on the wire.
    pub async fn send(&mut self, message: &Message, frame_bytes_max: u32) -> Result<usize, WriteError> {
        let frame = wire::encode_parts(message, frame_bytes_max)?;
        let len = frame.len();
        self.put(frame.head.freeze(), false).await?;
        if !frame.payload.is_empty() {
            self.put(frame.payload, true).await?;
        }
        Ok(len)
    }

    /// [`tokio::io::BufWriter`]'s rule, part by part: a part that would
    /// overflow the buffer flushes it first, and a part as large as the
    /// buffer goes straight out.
    async fn put(&mut self, part: Bytes, by_reference: bool) -> std::io::Result<()> {
        if self.buffered() + part.len() > self.buffer_bytes {
            self.flush().await?;
        }
        if part.len() >= self.buffer_bytes {
            self.writer.write_all(&part).await
        } else if by_reference && self.vectored {
            self.seal();
            self.parts.push(part);
            Ok(())
        } else {
            self.staging.extend_from_slice(&part);
            Ok(())
        }
    }

    fn seal(&mut self) {
        if !self.staging.is_empty() {
            self.parts.push(self.staging.split().freeze());
        }
    }

    /// Write everything gathered.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.seal();
        if self.parts.has_remaining() {
            self.writer.write_all_buf(&mut self.parts).await?;
        }
        self.writer.flush().await
    }

    /// Write everything gathered, then close the sending side.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.writer.shutdown().await
    }
}

/// Byte strings written in order, as one [`Buf`] whose chunks fill a
/// vectored write.
#[derive(Debug, Default)]
struct Parts {
    /// Never holds an empty part.
    queue: VecDeque<Bytes>,
    remaining: usize,
}

impl Parts {
    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.remaining += part.len();
            self.queue.push_back(part);
        }
    }
}

impl Buf for Parts {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.queue.front().map_or(&[], |part| part.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance {cnt} past the {} bytes remaining", self.remaining);
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.queue.front_mut() else { break };
            if cnt < front.len() {
                front.advance(cnt);
                break;
            }
            cnt -= front.len();
            self.queue.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, part) in dst.iter_mut().zip(&self.queue) {
            *slot = IoSlice::new(part);
            filled += 1;
        }
        filled
    }
}

/// Write one frame; returns the bytes written. A block's data goes out as
/// its own write, uncopied.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
    frame_bytes_max: u32,
) -> Result<usize, WriteError> {
    let frame = wire::encode_parts(message, frame_bytes_max)?;
    writer.write_all(&frame.head).await?;
    if !frame.payload.is_empty() {
        writer.write_all(&frame.payload).await?;
    }
    Ok(frame.len())
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The message cannot be encoded within the limit (a local bug).
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    /// The stream failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shoal_core::ids::{FileId, PieceIndex};
    use shoal_core::wire::ExchangeMessage;

    const MAX: u32 = 256 * 1024;

    #[tokio::test]
    async fn frames_cross_a_stream_in_order() {
        let (client, server) = tokio::io::duplex(1024); // small: forces partial reads
        let block = Message::Exchange(ExchangeMessage::Block {
            file: FileId([3; 32]),
            piece: PieceIndex(1),
            offset: 16384,
            data: Bytes::from(vec![9u8; 16384]),
        });
        let expected = vec![Message::Keepalive, block.clone(), Message::Keepalive];
        let writer = tokio::spawn(async move {
            let mut client = client;
            for m in [Message::Keepalive, block, Message::Keepalive] {
                write_frame(&mut client, &m, MAX).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(server, MAX);
        let mut got = Vec::new();
        while let Some((m, _)) = reader.next().await.unwrap() {
            got.push(m);
        }
        writer.await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(&(MAX + 1).to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(server, MAX);
        assert!(matches!(reader.next().await, Err(FrameError::Decode(DecodeError::FrameTooLarge { .. }))));

        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(&10u32.to_be_bytes()).await.unwrap();
        client.write_all(&[1, 2]).await.unwrap();
        drop(client);
        let mut reader = FrameReader::new(server, MAX);
        assert!(matches!(reader.next().await, Err(FrameError::Truncated)));
    }

    fn block(index: u32) -> Message {
        let data: Vec<u8> = (0..16384u32).map(|i| (i.wrapping_mul(31) ^ index) as u8).collect();
        Message::Exchange(ExchangeMessage::Block {
            file: FileId([5; 32]),
            piece: PieceIndex(index / 64),
            offset: (index % 64) * 16384,
            data: Bytes::from(data),
        })
    }

    /// Blocks with small frames between them, through a `FrameWriter`,
    /// read back by a `FrameReader` that keeps every frame it hands out:
    /// a read buffer still shared with a frame must never be reused.
    async fn round_trip<W, R>(writer: W, reader: R)
    where
        W: AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + Unpin,
    {
        let sent: Vec<Message> = (0..200).flat_map(|i| [block(i), Message::Keepalive]).chain([block(999)]).collect();
        let expected = sent.clone();
        let writing = tokio::spawn(async move {
            let mut writer = FrameWriter::new(writer, 128 * 1024);
            let mut bytes = 0;
            for message in &sent {
                bytes += writer.send(message, MAX).await.unwrap();
            }
            writer.shutdown().await.unwrap();
            assert_eq!(writer.buffered(), 0);
            bytes
        });
        let mut reader = FrameReader::new(reader, MAX);
        let (mut got, mut bytes) = (Vec::new(), 0);
        while let Some((message, len)) = reader.next().await.unwrap() {
            got.push(message);
            bytes += len;
            assert!(reader.spare.len() <= READ_BUFFERS_SPARE_MAX);
        }
        assert_eq!(writing.await.unwrap(), bytes);
        assert!(got == expected, "every frame arrives whole, in order, and stays intact");
    }

    /// A stream without vectored writes, as turmoil's.
    struct Plain<W>(W);

    impl<W: AsyncWrite + Unpin> AsyncWrite for Plain<W> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn frames_round_trip_over_a_stream_without_vectored_writes() {
        let (client, server) = tokio::io::duplex(7000);
        let client = Plain(client);
        assert!(!client.is_write_vectored());
        round_trip(client, server).await;
    }

    #[tokio::test]
    async fn frames_round_trip_over_tcp_with_vectored_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_, writer) = client.into_split();
        assert!(writer.is_write_vectored());
        round_trip(writer, server).await;
    }

    #[tokio::test]
    async fn a_busy_reader_reuses_its_buffers_once_frames_are_dropped() {
        let (client, server) = tokio::io::duplex(300 * 1024);
        let writing = tokio::spawn(async move {
            let mut writer = FrameWriter::new(client, 128 * 1024);
            for i in 0..400 {
                writer.send(&block(i), MAX).await.unwrap();
            }
            writer.shutdown().await.unwrap();
        });
        let mut reader = FrameReader::new(server, MAX);
        let mut count = 0;
        while let Some((message, _)) = reader.next().await.unwrap() {
            assert_eq!(message, block(count));
            count += 1;
        }
        writing.await.unwrap();
        assert_eq!(count, 400);
        // 6.4 MiB went through, the frames dropped as they came: a few
        // buffers went round (a new one per read would be 25 and more).
        assert!(reader.allocations <= READ_BUFFERS_SPARE_MAX + 2, "{} buffers", reader.allocations);
    }
}
