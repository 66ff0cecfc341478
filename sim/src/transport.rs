//! The node's transport over turmoil's simulated TCP: the unmodified
//! driver runs on it inside each simulated host.

use std::io;
use std::net::SocketAddr;

use shoal_node::transport::{Listener, PieceHashing, Transport};

/// TCP from `turmoil::net`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TurmoilTcp;

/// A turmoil listener.
pub struct TurmoilListener(turmoil::net::TcpListener);

impl Listener for TurmoilListener {
    type Stream = turmoil::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        self.0.accept().await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Transport for TurmoilTcp {
    type Stream = turmoil::net::TcpStream;
    type Reader = turmoil::net::tcp::OwnedReadHalf;
    type Writer = turmoil::net::tcp::OwnedWriteHalf;
    type Listener = TurmoilListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        turmoil::net::TcpListener::bind(addr).await.map(TurmoilListener)
    }
    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect(addr).await
    }
    fn split(stream: Self::Stream) -> (Self::Reader, Self::Writer) {
        stream.into_split()
    }
    /// turmoil runs every host on one thread in virtual time: a worker's
    /// answer would arrive after however much simulated time the real
    /// thread took, so runs would not replay.
    fn piece_hashing(&self) -> PieceHashing {
        PieceHashing::Inline
    }
}
