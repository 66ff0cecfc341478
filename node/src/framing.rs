//! Frames over a byte stream: [`FrameReader`] buffers at most one maximal
//! frame (an oversized length prefix is rejected before any body is read)
//! and [`write_frame`] sends a block's data without copying it.

use bytes::BytesMut;
use shoal_core::wire::{self, DecodeError, EncodeError, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Reads frames from a stream.
pub struct FrameReader<R> {
    reader: R,
    buf: BytesMut,
    frame_bytes_max: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader accepting frames up to `frame_bytes_max`.
    pub fn new(reader: R, frame_bytes_max: u32) -> Self {
        Self { reader, buf: BytesMut::with_capacity(64 * 1024), frame_bytes_max }
    }

    /// The next message with the wire bytes it took, or `None` at a clean
    /// end of stream.
    pub async fn next(&mut self) -> Result<Option<(Message, usize)>, FrameError> {
        loop {
            let before = self.buf.len();
            if let Some(message) = wire::decode_frame(&mut self.buf, self.frame_bytes_max)? {
                return Ok(Some((message, before - self.buf.len())));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(FrameError::Truncated) };
            }
        }
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
}
