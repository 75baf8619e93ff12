//! The connection under a socket's WebSocket stream, and how a socket writes to it.
//!
//! After the upgrade the TCP stream is taken back from hyper, with any bytes hyper had already
//! read past the handshake (they go to the WebSocket layer first), so that a socket's writes go
//! straight to the kernel: on Linux, a write is first tried as one non-blocking `send` (or
//! `sendmsg`) on the socket, without the runtime's readiness bookkeeping. A write that finds the
//! socket full (`WouldBlock`, or only part of it taken) marks the connection full, and from then
//! on writes go through the runtime, which registers for writability as for any write, until one
//! of them goes through whole. Reads always go through the runtime.
//!
//! Mixing the two is safe because the runtime clears a connection's write readiness only after
//! a write of its own failed, and only if no readiness event came in since; every send that
//! leaves the socket full, ours included, arms the kernel's next writability event. A readiness
//! the runtime still holds from before our sends costs one failed send when it is next used.
//!
//! Skipping the runtime on a write that goes through saves reading the connection's readiness
//! (a cache line of its own per socket, cold after a linger) and two layers of dispatch, hyper's
//! boxed connection and its adapter: about 5-7 % of the server's CPU per delivery at fan-out
//! (docs/architecture.md, docs/benchmarks.md). The runtime's cooperative budget is still charged
//! for every write.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A socket's connection: the TCP stream itself, written directly while it has room (`Left`), or
/// hyper's upgraded connection, written through the runtime, when the stream could not be taken
/// back (`Right`; it always can with the node's own listener, see `crate::http::serve`).
pub type Transport = Either<Direct, TokioIo<Upgraded>>;

/// A TCP stream written directly while it has room.
#[derive(Debug)]
pub struct Direct {
    stream: TcpStream,
    /// The last direct write found the socket full: writes go through the runtime until one goes
    /// through whole.
    full: bool,
}

/// The connection of an upgraded request, and the bytes hyper had already read from it past the
/// handshake (a client may send its first frames with its request). When the stream cannot be
/// taken back, hyper's connection replays those bytes itself and none are returned.
pub fn take_back(upgraded: Upgraded) -> (Transport, Vec<u8>) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        // Copied out (usually nothing): the buffer itself is hyper's whole read buffer, which the
        // socket would otherwise keep for its life.
        Ok(parts) => (Either::Left(Direct { stream: parts.io.into_inner(), full: false }), parts.read_buf.to_vec()),
        Err(upgraded) => (Either::Right(TokioIo::new(upgraded)), Vec::new()),
    }
}

impl Direct {
    /// Writes with `direct` while the socket has room, else with `runtime`; both write (part of)
    /// the same `len` bytes.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        direct: impl Fn(&TcpStream) -> io::Result<usize>,
        runtime: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if !self.full {
            let coop = ready!(tokio::task::coop::poll_proceed(cx));
            match send_direct(&self.stream, direct) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.full = true,
                sent => {
                    coop.made_progress();
                    self.full = matches!(sent, Ok(n) if n < len);
                    return Poll::Ready(sent);
                }
            }
        }
        let sent = ready!(runtime(Pin::new(&mut self.stream), cx));
        if matches!(sent, Ok(n) if n >= len) {
            self.full = false;
        }
        Poll::Ready(sent)
    }
}

/// Runs `send` on `stream` until it is not interrupted. `WouldBlock`: the socket is full (or,
/// off Linux, direct writes are not used).
fn send_direct(stream: &TcpStream, send: impl Fn(&TcpStream) -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match send(stream) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            sent => return sent,
        }
    }
}

/// The most slices one gathered write passes on (`IOV_MAX` on Linux; the rest is a partial write).
const MAX_IOV: usize = 1024;

#[cfg(target_os = "linux")]
fn send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(stream).send_with_flags(buf, libc::MSG_NOSIGNAL)
}

#[cfg(target_os = "linux")]
fn send_vectored(stream: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    socket2::SockRef::from(stream).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
}

#[cfg(not(target_os = "linux"))]
fn send(_: &TcpStream, _: &[u8]) -> io::Result<usize> {
    Err(io::ErrorKind::WouldBlock.into())
}

#[cfg(not(target_os = "linux"))]
fn send_vectored(_: &TcpStream, _: &[IoSlice<'_>]) -> io::Result<usize> {
    Err(io::ErrorKind::WouldBlock.into())
}

impl AsyncRead for Direct {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Direct {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(
            cx,
            buf.len(),
            |stream| send(stream, buf),
            |stream, cx| stream.poll_write(cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs = &bufs[..bufs.len().min(MAX_IOV)];
        self.get_mut().poll_write_with(
            cx,
            bufs.iter().map(|buf| buf.len()).sum(),
            |stream| send_vectored(stream, bufs),
            |stream, cx| stream.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback: the server's end written directly, and the client's.
    async fn pair() -> (Direct, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (accepted, client) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        (Direct { stream: accepted.expect("accept").0, full: false }, client.expect("connect"))
    }

    #[tokio::test]
    async fn a_full_socket_turns_writes_over_to_the_runtime_until_one_goes_through_whole() {
        let (mut transport, mut client) = pair().await;
        transport.write_all(b"hello").await.expect("a write to an empty socket");
        assert!(!transport.full, "written directly");

        // Fill the socket without reading: the write that finds it full waits in the runtime.
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let chunk = vec![7u8; 256 * 1024];
        let mut queued = 5;
        let pending = loop {
            match Pin::new(&mut transport).poll_write(&mut cx, &chunk) {
                Poll::Ready(Ok(n)) => queued += n,
                Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                Poll::Pending => break true,
            }
        };
        assert!(pending && transport.full, "a full socket is marked full");

        // The client reads everything: the next write goes through, and writes are direct again.
        let mut buf = vec![0u8; 256 * 1024];
        let mut read = 0;
        while read < queued {
            read += client.read(&mut buf).await.expect("read");
        }
        tokio::time::timeout(Duration::from_secs(10), transport.write_all(b"!"))
            .await
            .expect("room again")
            .expect("write");
        assert!(!transport.full, "a whole write through the runtime ends the full state");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_that_keep_filling_the_socket_deliver_every_byte_in_order() {
        let (mut transport, mut client) = pair().await;
        // Far more than the socket buffers hold, so writes keep finding the socket full, while
        // the reader drains it on another thread.
        const CHUNK: usize = 64 * 1024 + 7;
        const CHUNKS: usize = 512;
        let writer = tokio::spawn(async move {
            let chunk: Vec<u8> = (0..=255u8).cycle().take(CHUNK).collect();
            for index in 0..CHUNKS {
                // Single and gathered writes alternate.
                if index % 2 == 0 {
                    transport.write_all(&chunk).await.expect("write");
                } else {
                    let (head, tail) = chunk.split_at(CHUNK / 2);
                    let mut slices = [IoSlice::new(head), IoSlice::new(tail)];
                    let mut bufs = &mut slices[..];
                    while !bufs.is_empty() {
                        let written = transport.write_vectored(bufs).await.expect("gathered write");
                        IoSlice::advance_slices(&mut bufs, written);
                    }
                }
            }
            // Dropped here: the reader sees the end of the stream.
        });
        let received = tokio::time::timeout(Duration::from_secs(60), async {
            let mut received = Vec::with_capacity(CHUNK * CHUNKS);
            client.read_to_end(&mut received).await.expect("read");
            received
        })
        .await
        .expect("every byte within a minute");
        writer.await.expect("writer");
        assert_eq!(received.len(), CHUNK * CHUNKS, "every byte arrives");
        let expected: Vec<u8> = (0..=255u8).cycle().take(CHUNK).collect();
        for (index, chunk) in received.chunks(CHUNK).enumerate() {
            assert!(chunk == expected.as_slice(), "chunk {index} arrived intact and in order");
        }
    }
}
