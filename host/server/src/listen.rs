//! The accept loop both listeners run: the V2 HTTP API and the gRPC endpoint.
//!
//! Why not `axum::serve` or tonic's own server: one loop of our own serves both with the same
//! connection settings (HTTP/2 flow-control windows big enough for large tensors, `TCP_NODELAY`,
//! a deadline for request headers), the same graceful shutdown (stop accepting, let every
//! connection finish its requests), and is the one place TLS wraps a connection (see
//! `tls.rs`), its handshake on the connection's own task so a slow client delays no other.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::tls::TlsReloader;

/// HTTP/2 windows: with the 64 KiB default a 4 MiB tensor waits on ~60 round trips of window
/// updates; these let it stream at once. (Adaptive windows would start from the default again.)
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame a client may send (the default is 16 KiB): a 4 MiB tensor in 4 frames
/// instead of 256.
const MAX_FRAME: u32 = 1 << 20;
/// Concurrent requests (streams) one HTTP/2 connection may have; more wait for a free one.
const MAX_STREAMS: u32 = 256;
/// A client must send a request's headers within this long (slow-header clients hold a
/// connection for nothing).
const HEADER_DEADLINE: Duration = Duration::from_secs(30);

/// A client must finish its TLS handshake within this long.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Which protocols a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 and HTTP/2 (the V2 REST API).
    Http,
    /// HTTP/2 only (gRPC).
    Http2Only,
}

/// Serves `service` on every connection `listener` accepts (over TLS with `tls`) until
/// `shutdown` resolves, then waits for the open connections to finish their requests.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    protocols: Protocols,
    tls: Option<Arc<TlsReloader>>,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = builder(protocols);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let service = TowerToHyperService::new(service.clone());
        // The configuration current now: a reloaded certificate serves new connections only.
        let acceptor = tls.as_ref().map(|tls| tls.acceptor(protocols));
        tokio::spawn(async move {
            let served = match acceptor {
                None => {
                    let io = TokioIo::new(stream);
                    watcher.watch(builder.serve_connection(io, service)).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    };
                    let io = TokioIo::new(stream);
                    watcher.watch(builder.serve_connection(io, service)).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

fn builder(protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_DEADLINE);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(Duration::from_secs(60));
    match protocols {
        Protocols::Http => builder,
        Protocols::Http2Only => builder.http2_only(),
    }
}
