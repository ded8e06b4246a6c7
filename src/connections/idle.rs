//! Closes gRPC connections that hold a place without using it: one that
//! sends nothing at all within [`HANDSHAKE_TIMEOUT`], and one with no
//! request in flight for the idle timeout. Requests are counted per
//! connection by [`ActivityLayer`]; the connection's reader closes it
//! ([`IdleClose`]), and the client reconnects when it needs to.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::ConnectionPermit;
use crate::peer::Peer;

/// Longest a new connection may stay silent (10 s): a client sends its
/// preface as soon as it connects.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest time a connection may stay open with no request in
/// flight (5 minutes); clients reconnect when they next need the broker.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a request learns of its connection (tonic puts it in the request's
/// extensions).
#[derive(Clone)]
pub struct ConnectionInfo {
    /// The peer, with the place (host or pod) read when it connected.
    pub peer: Option<Peer>,
    /// Requests in flight on the connection.
    pub activity: Arc<Activity>,
}

/// Requests in flight on one connection, and since when it has had none.
pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request ended.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// Counts a request until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    /// When the connection may be closed for idleness, if nothing starts.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
        Some(self.opened + last + timeout)
    }
}

/// One request in flight; dropped when its response has been sent (or the
/// request abandoned).
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_end_ms.fetch_max(now, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection that ends itself when idle (see the module
/// documentation), and holds its place in the connection bounds.
pub struct IdleClose<IO> {
    io: IO,
    peer: Option<Peer>,
    activity: Arc<Activity>,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    spoken: bool,
    _permit: ConnectionPermit,
}

impl IdleClose<tokio::net::UnixStream> {
    /// Wraps a connection from `peer` (read once at accept) admitted with
    /// `permit`; it may stay idle for `timeout`.
    pub fn new(
        io: tokio::net::UnixStream,
        peer: Option<Peer>,
        permit: ConnectionPermit,
        timeout: Duration,
    ) -> Self {
        Self {
            io,
            peer,
            activity: Arc::new(Activity::new()),
            timeout,
            timer: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
            spoken: false,
            _permit: permit,
        }
    }
}

impl<IO> IdleClose<IO> {
    /// Whether the connection should be closed now; else arms the timer.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if !self.spoken {
                return true;
            }
            match self.activity.idle_deadline(self.timeout) {
                Some(deadline) if deadline <= Instant::now() => return true,
                Some(deadline) => self.timer.as_mut().reset(deadline),
                // Busy: look again a whole timeout from now.
                None => self.timer.as_mut().reset(Instant::now() + self.timeout),
            }
        }
    }
}

impl<IO> Connected for IdleClose<IO> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            peer: self.peer,
            activity: self.activity.clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleClose<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut self.io).poll_read(cx, buf) {
            if !self.spoken && buf.filled().len() > before {
                self.spoken = true;
                let deadline = Instant::now() + self.timeout;
                self.timer.as_mut().reset(deadline);
            }
            return Poll::Ready(result);
        }
        if self.expired(cx) {
            tracing::debug!(
                uid = self.peer.map(|p| p.uid),
                spoken = self.spoken,
                "closing an idle connection"
            );
            // The end of the stream: h2 closes the connection.
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

crate::connections::write_through!(IdleClose);

/// Counts each request in flight on its connection, from the call until
/// its response body is done (for a watch stream, until the stream ends).
#[derive(Clone, Copy, Debug, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ActivityService { inner }
    }
}

/// See [`ActivityLayer`].
#[derive(Clone, Debug)]
pub struct ActivityService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for ActivityService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|connection| connection.activity.start());
        TrackedFuture {
            inner: self.inner.call(request),
            guard,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future that hands its request's guard to the body.
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<RequestGuard>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            body,
            _guard: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's guard until it is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        body: B,
        _guard: Option<RequestGuard>,
    }
}

impl<B: Body<Data = Bytes>> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_idle_deadline_follows_the_last_request() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_secs(300);
        assert_eq!(
            activity.idle_deadline(timeout),
            Some(activity.opened + timeout)
        );
        let guard = activity.start();
        assert_eq!(activity.idle_deadline(timeout), None, "busy");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(guard);
        let deadline = activity.idle_deadline(timeout).unwrap();
        assert_eq!(deadline - activity.opened, Duration::from_secs(400));
    }
}
