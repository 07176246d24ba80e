//! The gRPC listener: accepts TCP and hands tonic only connections that finished their
//! handshake — the TLS handshake, or on plaintext the HTTP/2 client preface — within
//! `handshake_timeout_ms`, with at most [`MAX_HANDSHAKES`] in progress (past it a new connection
//! is closed at once). A peer that sends nothing, half a preface, a byte a second, an HTTP/1.1
//! request or a TLS ClientHello on the plaintext port holds no connection past the timeout, and
//! nothing of the server's but a socket and a small task until then.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 1024;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a new connection must finish before tonic gets it.
pub trait Handshake: Clone + Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;

    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Plaintext HTTP/2: the client preface, read and then replayed to the server.
#[derive(Clone, Copy, Debug, Default)]
pub struct Preface;

impl Handshake for Preface {
    type Stream = Prefaced;

    async fn handshake(&self, mut tcp: TcpStream) -> io::Result<Prefaced> {
        let mut got = [0u8; PREFACE.len()];
        let mut have = 0;
        while have < got.len() {
            let n = tcp.read(&mut got[have..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            // Wrong from the first differing byte: an HTTP/1.1 request, a TLS ClientHello.
            if got[have..have + n] != PREFACE[have..have + n] {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not an HTTP/2 client preface",
                ));
            }
            have += n;
        }
        Ok(Prefaced {
            tcp,
            replay: PREFACE.len(),
        })
    }
}

/// A TCP stream whose first bytes, the preface, are read again by the server.
pub struct Prefaced {
    tcp: TcpStream,
    /// Preface bytes the server has yet to read.
    replay: usize,
}

impl AsyncRead for Prefaced {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay > 0 {
            let start = PREFACE.len() - self.replay;
            let n = self.replay.min(buf.remaining());
            buf.put_slice(&PREFACE[start..start + n]);
            self.replay -= n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefaced {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

impl Connected for Prefaced {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// A connection that ends at a deadline: reads see the end of the stream and writes fail, so
/// the server closes it. tonic sends GOAWAY at `max_connection_age` but, given a grace, never
/// does (it only closes at age plus grace): the GOAWAY is tonic's, the close after the grace
/// is this.
pub struct Aged<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Aged<S> {
    fn ended(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Aged<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ended(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Aged<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.ended(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.ended(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Aged<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> S::ConnectInfo {
        self.inner.connect_info()
    }
}

/// How the listener treats new connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest a handshake may take.
    pub handshake: Duration,
    /// When a connection is closed, counted from its handshake: `max_connection_age` plus its
    /// grace; `None`: never.
    pub lifetime: Option<Duration>,
}

/// Accepts connections on `listener` and yields those whose handshake finished within the
/// limit, until `stop`.
pub fn incoming<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    limits: Limits,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Aged<H::Stream>>> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, go on.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                metrics::counter!("chargegate_calls_shed_total", "reason" => "handshakes")
                    .increment(1);
                tracing::debug!(%peer, "too many handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (handshake, tx, stop) = (handshake.clone(), tx.clone(), stop.clone());
            tokio::spawn(async move {
                let done = tokio::select! {
                    _ = stop.cancelled() => return,
                    done = tokio::time::timeout(limits.handshake, handshake.handshake(tcp)) => done,
                };
                drop(permit);
                match done {
                    Ok(Ok(stream)) => {
                        let aged = Aged {
                            inner: stream,
                            deadline: limits.lifetime.map(|l| Box::pin(tokio::time::sleep(l))),
                        };
                        let _ = tx.send(Ok(aged)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "handshake failed"),
                    Err(_) => tracing::debug!(%peer, "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
