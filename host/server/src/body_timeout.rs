//! A request body that fails when the client stops sending it.
//!
//! Every tenant is hostile: a client can open an upload (which reserves storage quota and holds
//! a temporary file) or an inference request (which holds in-flight budget and a concurrency
//! slot) and then send one byte a minute, holding all of it forever. Every request body is
//! wrapped in an [`IdleBody`] (see `app.rs`): if no part of the body arrives for
//! `--body-idle-timeout-seconds` (30 s by default, nginx's `client_body_timeout` is 60 s), the
//! body ends with [`BodyIdle`], which readers answer with 408 and which frees everything the
//! request held. The clock starts the first time the reader finds nothing to read and restarts
//! with every frame, so a slow but steady upload is never cut off.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use weft_core::{Error, ErrorKind};

/// Default of `--body-idle-timeout-seconds`.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The error a body ends with when its client sent nothing for the idle timeout.
#[derive(Debug)]
pub struct BodyIdle(pub Duration);

impl std::fmt::Display for BodyIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no part of the request body arrived for {} s (--body-idle-timeout-seconds)",
            self.0.as_secs()
        )
    }
}

impl std::error::Error for BodyIdle {}

/// A body that ends with [`BodyIdle`] after `idle` without a frame.
///
/// The timer is armed the first time the body has nothing ready, not when the request
/// arrives: a body that is never read (a GET) or that is already whole when it is read (most
/// small requests) costs no timer at all.
pub struct IdleBody {
    inner: Body,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl IdleBody {
    pub fn new(inner: Body, idle: Duration) -> Self {
        IdleBody {
            inner,
            idle,
            timer: None,
        }
    }
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(timer) = &mut this.timer {
                    timer.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a reader reports for a body that failed with `error`: 408 when the client went
/// idle, else 400 "cannot read request body".
pub fn read_error(error: &(dyn std::error::Error + 'static)) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(idle) = current.downcast_ref::<BodyIdle>() {
            return Error::new(ErrorKind::RequestTimeout, idle.to_string());
        }
        cause = current.source();
    }
    Error::invalid(format!("cannot read request body: {error}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body whose frames the test sends when it wants.
    struct Channel(mpsc::Receiver<Bytes>);

    impl http_body::Body for Channel {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_with_request_timeout_and_a_steady_one_does_not() {
        let (sender, receiver) = mpsc::channel(4);
        let mut body = IdleBody::new(Body::new(Channel(receiver)), Duration::from_secs(30));
        // Frames 20 s apart, each awaited while the body has nothing (the timer is armed):
        // 60 s in all, past the 30 s timeout, and never cut off.
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            let sender = sender.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(20)).await;
                sender.send(Bytes::from_static(b"x")).await.unwrap();
            });
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert!(started.elapsed() >= Duration::from_secs(60));
        // Then 30 s of nothing: 408, naming the setting.
        let error = body.frame().await.unwrap().unwrap_err();
        let error = read_error(&error);
        assert_eq!(error.kind(), ErrorKind::RequestTimeout);
        assert!(
            error.to_string().contains("--body-idle-timeout-seconds"),
            "{error}"
        );
        // Any other body error stays a 400.
        let other = read_error(&std::io::Error::other("reset"));
        assert_eq!(other.kind(), ErrorKind::InvalidArgument);
    }
}
