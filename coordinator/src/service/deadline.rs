//! Server-side deadlines: how long one RPC may hold the coordinator's resources.
//!
//! Without them a client that opens a call and goes quiet keeps a task (and, for an Upload, a
//! staging directory) for as long as its connection lives; HTTP/2 and TCP keepalive
//! ([`super::serve`]) only catch peers that are gone, not ones that are alive and stalled.
//!
//! One layer, [`Deadlines`], bounds every call of the Coordinator service by the smaller of the
//! client's `grpc-timeout` and the server's limit for the method ([`Limits::call_limit`]):
//! - unary calls: [`Limits::rpc`] (`--rpc-timeout`);
//! - Lease and Complete may long-poll: their wait is clamped to [`Limits::max_wait`] (an
//!   elapsed wait is answered "no trial yet", as before), and the call is bounded by that cap
//!   plus [`Limits::rpc`], a backstop that only a stuck scheduler reaches;
//! - Report: [`Limits::rpc`] until the stream starts; then each piece may wait that long for
//!   the client to take it ([`super::report`]), so a client that stops reading does not pin
//!   the report's records in memory;
//! - Upload: no total limit of the server's (a GiB of weights over a slow link takes minutes),
//!   but [`Limits::upload_idle`] (`--upload-idle-timeout`) between chunks ([`next_within`]).
//!
//! A call past its deadline is answered `deadline_exceeded`, naming the RPC and the limit; the
//! handler's future is dropped, which is what releases what it held: a parked lease request's
//! reply channel closes (the scheduler then grants its trial to someone else), an Upload's
//! partial directory is removed by its drop guard, its lease untouched.
//!
//! tonic's transport enforces a client's `grpc-timeout` too, answering `cancelled`. This layer
//! sits inside it and fixes its deadline when the call arrives, before tonic arms its own timer
//! for the same duration, so for a client deadline the answer is ours.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderMap};
use tonic::{Status, Streaming};

/// The longest long-poll wait granted by default; longer requests are clamped.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The server's time limits (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest a call may take, long-poll waits aside; also how long a Report piece may wait
    /// for its client to read it.
    pub rpc: Duration,
    /// Longest an Upload may wait for the client's next chunk.
    pub upload_idle: Duration,
    /// Longest long-poll wait (Lease, Complete with `lease_next`); longer ones are clamped.
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rpc: Duration::from_secs(30),
            upload_idle: Duration::from_secs(60),
            max_wait: MAX_WAIT,
        }
    }
}

impl Limits {
    /// A requested long-poll wait, clamped to [`Limits::max_wait`].
    pub fn wait(&self, asked: Duration) -> Duration {
        asked.min(self.max_wait)
    }

    /// The server's own limit of a whole call of `method` (the last segment of the path);
    /// `None` for an Upload, which is bounded between chunks instead.
    pub fn call_limit(&self, method: &str) -> Option<Duration> {
        match method {
            "Upload" => None,
            "Lease" | "Complete" => Some(self.max_wait + self.rpc),
            _ => Some(self.rpc),
        }
    }
}

/// The answer to a call that ran out of time: which RPC, how long, and whose limit.
pub fn exceeded(rpc: &str, limit: Duration, whose: &str) -> Status {
    Status::deadline_exceeded(format!("{rpc}: deadline of {limit:?} passed ({whose})"))
}

/// The next message of a client stream, waiting at most `idle` for it.
pub async fn next_within<T>(
    rpc: &str,
    idle: Duration,
    stream: &mut Streaming<T>,
) -> Result<Option<T>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(message) => message,
        Err(_) => Err(exceeded(rpc, idle, "no data from the client; --upload-idle-timeout")),
    }
}

/// A client's `grpc-timeout` (1 to 8 digits and a unit: H, M, S, m, u, n); `None` when absent
/// or malformed (a malformed one is ignored, as tonic does).
pub fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Wraps the gRPC service; see the module documentation.
#[derive(Debug, Clone)]
pub struct Deadlines<S> {
    inner: S,
    limits: Limits,
}

impl<S> Deadlines<S> {
    pub fn new(inner: S, limits: Limits) -> Self {
        Deadlines { inner, limits }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Deadlines<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Deadlines<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let limit = match (client_timeout(request.headers()), self.limits.call_limit(&method)) {
            (Some(client), Some(server)) if server < client => Some((server, "the server's limit")),
            (Some(client), _) => Some((client, "the client's grpc-timeout")),
            (None, server) => server.map(|s| (s, "the server's limit")),
        };
        // Fixed now, not when the future is first polled: see the module documentation.
        let deadline = limit.map(|(d, _)| Instant::now() + d);
        let call = self.inner.call(request);
        Box::pin(async move {
            let (Some(deadline), Some((limit, whose))) = (deadline, limit) else {
                return call.await;
            };
            match tokio::time::timeout_at(deadline, call).await {
                Ok(response) => response,
                Err(_) => {
                    tracing::debug!(rpc = %method, ?limit, whose, "call ended at its deadline");
                    Ok(exceeded(&method, limit, whose).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// A service answering OK after `delay`, or never (`None`).
    #[derive(Clone)]
    struct Slow(Option<Duration>);

    impl Service<http::Request<()>> for Slow {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let delay = self.0;
            Box::pin(async move {
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
                Ok(Status::ok("").into_http())
            })
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits { rpc: 100 * MS, upload_idle: 100 * MS, max_wait: 200 * MS }
    }

    /// The status a call of `method` ends with, and how long it took.
    async fn call(inner: Slow, method: &str, grpc_timeout: Option<&str>) -> (Status, Duration) {
        let mut service = Deadlines::new(inner, limits());
        let mut request = http::Request::new(());
        *request.uri_mut() = format!("/msae.v1.Coordinator/{method}").parse().unwrap();
        if let Some(t) = grpc_timeout {
            request.headers_mut().insert("grpc-timeout", t.parse().unwrap());
        }
        let started = std::time::Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(20), service.call(request))
            .await
            .expect("the layer ends the call")
            .unwrap();
        (Status::from_header_map(response.headers()).unwrap(), started.elapsed())
    }

    #[tokio::test]
    async fn each_kind_of_call_ends_at_its_limit() {
        // Unary: --rpc-timeout; the message names the RPC and the limit.
        let (s, took) = call(Slow(None), "Register", None).await;
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("Register") && s.message().contains("100ms"), "{s:?}");
        assert!(took >= 90 * MS, "{took:?}");
        // A long poll: the longest wait plus --rpc-timeout.
        let (s, took) = call(Slow(None), "Lease", None).await;
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(took >= 290 * MS, "{took:?}");
        // A call that finishes in time is untouched.
        let (s, _) = call(Slow(Some(10 * MS)), "Status", None).await;
        assert_eq!(s.code(), Code::Ok);
        // Upload: no total limit of the server's.
        let (s, _) = call(Slow(Some(400 * MS)), "Upload", None).await;
        assert_eq!(s.code(), Code::Ok);
    }

    #[tokio::test]
    async fn a_shorter_client_deadline_wins_and_a_longer_one_does_not() {
        let (s, took) = call(Slow(None), "Lease", Some("50m")).await;
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("grpc-timeout"), "{s:?}");
        assert!(took >= 40 * MS, "{took:?}");
        let (s, took) = call(Slow(None), "Progress", Some("10S")).await;
        assert!(s.message().contains("server"), "{s:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        // An Upload honours the client's deadline.
        let (s, _) = call(Slow(None), "Upload", Some("50m")).await;
        assert_eq!(s.code(), Code::DeadlineExceeded);
    }

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        let parse = |text: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", text.parse().unwrap());
            client_timeout(&headers)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse("250m"), Some(250 * MS));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(client_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn waits_are_clamped_to_the_longest() {
        let l = limits();
        assert_eq!(l.wait(Duration::from_secs(30)), 200 * MS);
        assert_eq!(l.wait(50 * MS), 50 * MS);
        assert_eq!(Limits::default().wait(Duration::from_secs(3600)), MAX_WAIT);
    }
}
