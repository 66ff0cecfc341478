//! The transport the driver runs over: TCP from `tokio::net` for the
//! daemon, and (in `shoal-sim`) TCP from `turmoil::net` for simulations.
//! Addresses are `SocketAddr` because turmoil's `ToSocketAddrs` is sealed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

/// Where the driver hashes the pieces the node asks it to verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceHashing {
    /// In the loop, as soon as asked: the node has the answer before the
    /// loop's next step, so a run never depends on thread timing (a
    /// simulation in virtual time).
    Inline,
    /// On a worker thread: the loop goes on with the network while a
    /// piece is hashed (SHA-256 of every byte downloaded is a third of a
    /// busy downloader's CPU).
    Worker,
}

/// A listening socket.
pub trait Listener: Send + 'static {
    /// The stream type accepted.
    type Stream: Send + 'static;
    /// Wait for the next inbound connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// Where it listens.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Opens connections and listeners, and splits streams into owned halves
/// (turmoil has no borrowed `split`).
pub trait Transport: Clone + Send + Sync + 'static {
    /// A connected stream.
    type Stream: Send + 'static;
    /// The read half of a stream.
    type Reader: AsyncRead + Unpin + Send + 'static;
    /// The write half of a stream.
    type Writer: AsyncWrite + Unpin + Send + 'static;
    /// A listener.
    type Listener: Listener<Stream = Self::Stream>;

    /// Listen on `addr`.
    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;
    /// Connect to `addr`.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// Split a stream into halves owned by separate tasks.
    fn split(stream: Self::Stream) -> (Self::Reader, Self::Writer);
    /// Where pieces are hashed: on a worker thread, unless the transport
    /// runs in simulated time and must keep runs reproducible.
    fn piece_hashing(&self) -> PieceHashing {
        PieceHashing::Worker
    }
}

/// Real TCP from `tokio::net`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioTcp;

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        tokio::net::TcpListener::accept(self).await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

impl Transport for TokioTcp {
    type Stream = tokio::net::TcpStream;
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    type Listener = tokio::net::TcpListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
    }
    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        // Small control frames must not wait behind Nagle.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
    fn split(stream: Self::Stream) -> (Self::Reader, Self::Writer) {
        stream.into_split()
    }
}
