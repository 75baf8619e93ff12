//! The connection under a socket's WebSocket stream, and how a socket writes to it.
//!
//! After the upgrade the TCP stream is taken back from hyper, with any bytes hyper had already
//! read past the handshake (they go to the WebSocket layer first), so that a socket's writes go
//! straight to the kernel: each write is first tried as one non-blocking `send` (or `sendmsg`) on
//! the socket, without the runtime's readiness bookkeeping. Only a write that would block goes
//! through the runtime, which tries it again, finds the socket full, and registers for
//! writability as for any write; from then on the socket waits like any other. Reads always go
//! through the runtime.
//!
//! Skipping the runtime on a write that goes through saves reading the connection's readiness
//! (a cache line of its own per socket, cold after a linger) and two layers of dispatch, hyper's
//! boxed connection and its adapter: about 5-7 % of the server's CPU per delivery at fan-out
//! (docs/benchmarks.md).

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A socket's connection: the TCP stream itself, or hyper's upgraded connection when it could
/// not be taken back (it always can with the node's own listener, see `crate::http::serve`).
#[derive(Debug)]
pub enum Transport {
    /// The TCP stream, written directly (see the module doc).
    Tcp(TcpStream),
    /// Hyper's upgraded connection, written through the runtime.
    Upgraded(TokioIo<Upgraded>),
}

impl Transport {
    /// The connection of an upgraded request, and the bytes hyper had already read from it past
    /// the handshake (a client may send its first frames with its request).
    pub fn take_back(upgraded: Upgraded) -> (Self, Vec<u8>) {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Self::Tcp(parts.io.into_inner()), parts.read_buf.to_vec()),
            Err(upgraded) => (Self::Upgraded(TokioIo::new(upgraded)), Vec::new()),
        }
    }
}

/// Runs `send` on `stream`'s socket until it is not interrupted. `WouldBlock`: the socket is full.
fn send_now(stream: &TcpStream, send: impl Fn(SockRef<'_>) -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match send(SockRef::from(stream)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            sent => return sent,
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => match send_now(stream, |socket| socket.send_with_flags(buf, libc::MSG_NOSIGNAL)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pin::new(stream).poll_write(cx, buf),
                sent => Poll::Ready(sent),
            },
            Self::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => {
                match send_now(stream, |socket| socket.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pin::new(stream).poll_write_vectored(cx, bufs),
                    sent => Poll::Ready(sent),
                }
            }
            Self::Upgraded(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(stream) => stream.is_write_vectored(),
            Self::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Self::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback: the server's end as a [`Transport`], and the client's.
    async fn pair() -> (Transport, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (accepted, client) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        (Transport::Tcp(accepted.expect("accept").0), client.expect("connect"))
    }

    #[tokio::test]
    async fn writes_that_fill_the_socket_wait_for_room_and_every_byte_arrives_in_order() {
        let (mut transport, mut client) = pair().await;
        // Far more than the socket buffers hold, so the direct sends keep finding the socket
        // full and the writer keeps waiting for room through the runtime.
        const TOTAL: usize = 32 << 20;
        let writer = tokio::spawn(async move {
            let chunk: Vec<u8> = (0..=255u8).cycle().take(64 * 1024 + 7).collect();
            let mut sent = 0;
            while sent < TOTAL {
                let n = (TOTAL - sent).min(chunk.len());
                let (head, tail) = chunk[..n].split_at(n / 2);
                // Single and gathered writes alternate, both with the direct path and the fallback.
                if (sent / chunk.len()).is_multiple_of(2) {
                    transport.write_all(&chunk[..n]).await.expect("write");
                } else {
                    let mut slices = [IoSlice::new(head), IoSlice::new(tail)];
                    let mut bufs = &mut slices[..];
                    while !bufs.is_empty() {
                        let written = transport.write_vectored(bufs).await.expect("gathered write");
                        IoSlice::advance_slices(&mut bufs, written);
                    }
                }
                sent += n;
            }
            transport
        });
        let mut buf = vec![0u8; 256 * 1024];
        let mut expected_next = 0usize;
        let mut total = 0usize;
        while total < TOTAL {
            let n = client.read(&mut buf).await.expect("read");
            assert!(n > 0, "the connection closed after {total} bytes");
            for &byte in &buf[..n] {
                // Each chunk restarts the 0..=255 cycle: check position within the chunk.
                let position = expected_next % (64 * 1024 + 7);
                assert_eq!(byte, (position % 256) as u8, "byte {total} out of order");
                expected_next += 1;
                total += 1;
            }
        }
        writer.await.expect("writer");
    }
}
