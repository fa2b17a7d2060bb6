//! Status codes of requests refused before any handler ran.
//!
//! tonic answers a request body it cannot decode with `internal` (prost's parse errors, a
//! missing or truncated message, a bad compression flag) and one over the size limit with
//! `out_of_range`. Both blame the server for a client's mistake: a client that retries on
//! `internal` would retry garbage forever. [`StatusEdge`] wraps the service and rewrites those
//! answers to `invalid_argument` and `resource_exhausted` (what gRPC's own servers send).
//!
//! tonic refuses such requests with a trailers-only response (the status in the response
//! headers) before calling the handler; a handler's own status takes the same shape, so the
//! rewrite also checks the message, which is tonic's and prost's fixed wording. The handlers
//! never use `out_of_range` and use `internal` only with other messages.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::{Code, Status};

/// Largest request the coordinator decodes (tonic's default, stated so the limit is ours).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Message starts of tonic's and prost's answers to an undecodable request body.
const UNDECODABLE: &[&str] = &[
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "protocol error: received message with",
];

/// Message of tonic's answer to a request over the size limit.
const TOO_LARGE: &str = "decoded message length too large";

/// Wraps a gRPC service; see the module documentation.
#[derive(Debug, Clone)]
pub struct StatusEdge<S>(pub S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for StatusEdge<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for StatusEdge<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            remap(response.headers_mut());
            Ok(response)
        })
    }
}

/// Rewrites the status of a trailers-only response, when it is one of tonic's decoding answers.
fn remap(headers: &mut HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else { return };
    let message = status.message();
    let code = match status.code() {
        Code::Internal if UNDECODABLE.iter().any(|m| message.starts_with(m)) => {
            Code::InvalidArgument
        }
        Code::OutOfRange if message.contains(TOO_LARGE) => Code::ResourceExhausted,
        _ => return,
    };
    tracing::debug!(from = ?status.code(), to = ?code, %message, "request refused before decoding");
    headers.insert(Status::GRPC_STATUS, HeaderValue::from(code as i32));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remapped(status: Status) -> Code {
        let mut headers = HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        remap(&mut headers);
        Status::from_header_map(&headers).unwrap().code()
    }

    #[test]
    fn only_decoding_answers_change() {
        let garbage = Status::internal("failed to decode Protobuf message: invalid wire type");
        assert_eq!(remapped(garbage), Code::InvalidArgument);
        assert_eq!(remapped(Status::internal("Missing request message.")), Code::InvalidArgument);
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        assert_eq!(remapped(big), Code::ResourceExhausted);
        assert_eq!(remapped(Status::internal("store commit failed")), Code::Internal);
        assert_eq!(remapped(Status::not_found("no sweep")), Code::NotFound);
    }
}
