//! The gRPC service (`msae.v1.Coordinator`): the network edge of the scheduler.
//!
//! Every request is validated and converted to domain types here (`TryFrom`), so the scheduler
//! never sees generated protocol types or unchecked input: empty ids, oversized maps and
//! strings are refused with `invalid_argument`; non-finite metric values are dropped and noted on
//! the trial (a diverged training is an outcome worth keeping, not a protocol error). Scheduler
//! errors map to precise status codes (`not_found` for an unknown worker: re-register;
//! `failed_precondition` for a protocol mismatch; `unavailable` when the scheduler stopped).
//!
//! A `Complete` may carry the worker's next lease request (`lease_next`, `worker_id`,
//! `wait_ms`, checked like a `Lease`): the scheduler applies both in one batch and one commit,
//! so a worker pays one round trip per trial instead of two.
//!
//! Identifiers a client sends (names, device, ids, sweep and metric names) must not hold control
//! characters: they are logged, and a newline or escape sequence in one would forge or garble
//! log lines. The Report RPC streams its reply in pieces ([`report`]); requests tonic cannot
//! decode are answered `invalid_argument` or `resource_exhausted` ([`edge`]).
//!
//! Every call has a server-side deadline, and an Upload one between chunks ([`deadline`]).
//!
//! [`serve`] runs the service on a bound listener with an optional shared bearer token
//! ([`auth_interceptor`]) until a shutdown future resolves. Call
//! [`SchedulerHandle::shutdown`](crate::scheduler::SchedulerHandle::shutdown) before (or as
//! part of) that future so long-polling lease requests are answered at once.

use crate::model::{SweepRecord, TrialRecord};
use crate::scheduler::{
    Evaluation, LeaseGrant, NextLease, ProgressReport, SchedulerError, SchedulerHandle,
    TrialOutcome,
};
use msae_shared::class_stats::ClassStats;
use msae_shared::proto;
use msae_shared::proto::coordinator_server::{Coordinator, CoordinatorServer};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

pub mod deadline;
pub mod edge;
pub mod report;
mod status;
mod upload;

pub use deadline::{Limits, MAX_WAIT};
pub use report::{FetchError, ReportQuery, collect_records, collect_report, collect_text};

/// Longest accepted id or name.
pub const MAX_ID_LEN: usize = 256;
/// Longest accepted free text (error messages, artifact paths).
pub const MAX_TEXT_LEN: usize = 1 << 20;
/// Most entries in a metrics or scalars map.
pub const MAX_MAP_ENTRIES: usize = 10_000;

/// The gRPC service; cheap to clone (it holds a scheduler handle).
#[derive(Clone)]
pub struct CoordinatorService {
    scheduler: SchedulerHandle,
    /// When this service started, and how many trials were final then (for trials/s).
    started: (std::time::Instant, u64),
    /// The handlers' share of the deadlines: the longest wait, an Upload's idle limit, a
    /// Report piece's send limit (the calls as a whole are bounded by [`deadline::Deadlines`]).
    limits: Limits,
}

impl CoordinatorService {
    /// A service answering from `scheduler` within `limits`.
    pub fn new(scheduler: SchedulerHandle, limits: Limits) -> Self {
        let c = scheduler.counts().borrow().clone();
        let started = (std::time::Instant::now(), c.completed + c.pruned + c.failed);
        CoordinatorService { scheduler, started, limits }
    }
}

fn status_of(e: SchedulerError) -> Status {
    match e {
        SchedulerError::UnknownWorker(_) => Status::not_found(e.to_string()),
        SchedulerError::ProtocolVersion { .. } => Status::failed_precondition(e.to_string()),
        SchedulerError::Stopped | SchedulerError::Commit(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn check_id(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    check_name(field, v)
}

/// An identifier that may be empty: bounded, and without control characters (they would end
/// up raw in the coordinator's log).
fn check_name(field: &str, v: &str) -> Result<(), Status> {
    check_len(field, v, MAX_ID_LEN)?;
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{field} holds the control character {:?}; names and ids must be printable",
            c
        )));
    }
    Ok(())
}

fn check_len(field: &str, v: &str, max: usize) -> Result<(), Status> {
    if v.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max} are accepted",
            v.len()
        )));
    }
    Ok(())
}

/// Checks a metrics map; returns the finite values and the names of the dropped ones.
fn check_metrics(
    field: &str,
    map: HashMap<String, f64>,
) -> Result<(BTreeMap<String, f64>, Vec<String>), Status> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "{field} has {} entries; at most {MAX_MAP_ENTRIES} are accepted",
            map.len()
        )));
    }
    let mut kept = BTreeMap::new();
    let mut dropped = Vec::new();
    for (k, v) in map {
        if k.is_empty() {
            return Err(Status::invalid_argument(format!("{field} has an empty name")));
        }
        check_name(&format!("{field} name"), &k)?;
        if v.is_finite() {
            kept.insert(k, v);
        } else {
            dropped.push(format!("non-finite {k} = {v}"));
        }
    }
    dropped.sort();
    Ok((kept, dropped))
}

/// A validated registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub protocol_version: u32,
    pub name: String,
    pub device: String,
}

impl TryFrom<proto::RegisterRequest> for Registration {
    type Error = Status;
    fn try_from(r: proto::RegisterRequest) -> Result<Self, Status> {
        check_name("name", &r.name)?;
        check_name("device", &r.device)?;
        Ok(Registration { protocol_version: r.protocol_version, name: r.name, device: r.device })
    }
}

/// Most evaluations one progress report may carry.
pub const MAX_EVALUATIONS: usize = 10_000;

/// A validated progress report.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate {
    pub lease_id: String,
    /// Finite values only (non-finite ones are dropped: the next report will carry new ones).
    pub report: ProgressReport,
}

impl TryFrom<proto::ProgressRequest> for ProgressUpdate {
    type Error = Status;
    fn try_from(r: proto::ProgressRequest) -> Result<Self, Status> {
        check_id("lease_id", &r.lease_id)?;
        let (scalars, mut dropped) = check_metrics("scalars", r.scalars)?;
        if r.evaluations.len() > MAX_EVALUATIONS {
            return Err(Status::invalid_argument(format!(
                "evaluations has {} entries; at most {MAX_EVALUATIONS} are accepted",
                r.evaluations.len()
            )));
        }
        let mut evaluations = Vec::with_capacity(r.evaluations.len());
        for e in r.evaluations {
            let (scalars, d) = check_metrics("evaluations.scalars", e.scalars)?;
            dropped.extend(d);
            let classes = class_stats("evaluations.class_stats", &r.lease_id, e.class_stats);
            evaluations.push(Evaluation { step: e.step, scalars, classes });
        }
        evaluations.sort_by_key(|e| e.step);
        if !dropped.is_empty() {
            tracing::debug!(lease = %r.lease_id, ?dropped, "dropped non-finite progress scalars");
        }
        Ok(ProgressUpdate {
            lease_id: r.lease_id,
            report: ProgressReport { step: r.step, scalars, evaluations },
        })
    }
}

/// A validated completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub lease_id: String,
    pub outcome: TrialOutcome,
    /// The worker's next lease request carried along (`lease_next`), its wait clamped to
    /// [`MAX_WAIT`] (and by the service to [`Limits::max_wait`]).
    pub next: Option<NextLease>,
}

impl TryFrom<proto::CompleteRequest> for Completion {
    type Error = Status;
    fn try_from(r: proto::CompleteRequest) -> Result<Self, Status> {
        check_id("lease_id", &r.lease_id)?;
        check_len("error", &r.error, MAX_TEXT_LEN)?;
        check_len("artifact", &r.artifact, MAX_TEXT_LEN)?;
        if !r.duration_s.is_finite() || r.duration_s < 0.0 {
            return Err(Status::invalid_argument(format!(
                "duration_s must be a finite, non-negative number of seconds, got {}",
                r.duration_s
            )));
        }
        let (metrics, dropped) = check_metrics("metrics", r.metrics)?;
        let classes =
            if r.success { class_stats("class_stats", &r.lease_id, r.class_stats) } else { None };
        // The same limits as a Lease request; worker_id is only read when a lease is asked for.
        let next = if r.lease_next {
            check_id("worker_id", &r.worker_id)?;
            Some(NextLease { worker_id: r.worker_id, wait: clamp_wait(r.wait_ms) })
        } else {
            None
        };
        Ok(Completion {
            lease_id: r.lease_id,
            next,
            outcome: TrialOutcome {
                success: r.success,
                permanent: !r.success && r.permanent,
                final_step: r.final_step,
                metrics,
                error: r.error,
                artifact: (!r.artifact.is_empty()).then_some(r.artifact),
                duration_s: Some(r.duration_s),
                dropped,
                pruned: r.success && r.pruned,
                classes,
            },
        })
    }
}

/// Per-class statistics as a worker sent them, or `None` (logged) when their arrays do not
/// make one table. They are only plotted, so a malformed table costs itself, never the
/// evaluation or the result that carried it.
fn class_stats(
    field: &str,
    lease_id: &str,
    c: Option<proto::ClassStats>,
) -> Option<Arc<ClassStats>> {
    let c = c?;
    let routing = (!c.routing_score_mean.is_empty()).then_some(c.routing_score_mean);
    match ClassStats::new(
        c.num_stripes as usize,
        c.num_classes as usize,
        c.class_samples,
        c.stripe_class_active,
        routing,
        c.class_mse,
    ) {
        Ok(stats) => Some(Arc::new(stats)),
        Err(e) => {
            tracing::warn!(lease = %lease_id, "{field} dropped: {e}");
            None
        }
    }
}

/// A requested long-poll wait, clamped to [`MAX_WAIT`].
fn clamp_wait(wait_ms: u32) -> Duration {
    Duration::from_millis(wait_ms.into()).min(MAX_WAIT)
}

/// A granted lease as the protocol carries it.
fn lease_proto(g: LeaseGrant) -> proto::Lease {
    proto::Lease {
        lease_id: g.lease_id,
        trial_id: g.trial_id,
        sweep: g.sweep,
        attempt: g.attempt,
        config_json: g.config_json,
        ttl_ms: g.ttl.as_millis().min(u32::MAX as u128) as u32,
        timeout_s: g.timeout.map_or(0.0, |t| t.as_secs_f64()),
        runner: g.runner.to_string(),
        noop_sleep_ms: g.noop_sleep_ms,
        upload: g.upload_limit.is_some(),
        upload_limit: g.upload_limit.unwrap_or(0),
    }
}

/// The raw records of a Report request with `records` set.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ReportJson {
    pub sweeps: Vec<SweepRecord>,
    pub trials: Vec<TrialRecord>,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let r = Registration::try_from(request.into_inner())?;
        let worker_id = self
            .scheduler
            .register(&r.name, &r.device, r.protocol_version)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::RegisterReply {
            worker_id,
            coordinator_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn lease(
        &self,
        request: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseReply>, Status> {
        let r = request.into_inner();
        check_id("worker_id", &r.worker_id)?;
        let wait = self.limits.wait(clamp_wait(r.wait_ms));
        let outcome = self.scheduler.lease(&r.worker_id, wait).await.map_err(status_of)?;
        Ok(Response::new(proto::LeaseReply {
            lease: outcome.lease.map(lease_proto),
            shutdown: outcome.shutdown,
        }))
    }

    async fn progress(
        &self,
        request: Request<proto::ProgressRequest>,
    ) -> Result<Response<proto::ProgressReply>, Status> {
        let p = ProgressUpdate::try_from(request.into_inner())?;
        let ack = self.scheduler.progress(&p.lease_id, p.report).await.map_err(status_of)?;
        Ok(Response::new(proto::ProgressReply {
            stop: ack.stop,
            reason: ack.reason,
            release: ack.release,
            prune: ack.prune,
        }))
    }

    async fn complete(
        &self,
        request: Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteReply>, Status> {
        let mut c = Completion::try_from(request.into_inner())?;
        if let Some(next) = &mut c.next {
            next.wait = self.limits.wait(next.wait);
        }
        let out = self
            .scheduler
            .complete_then_lease(&c.lease_id, c.outcome, c.next)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::CompleteReply {
            accepted: out.ack.accepted,
            reason: out.ack.reason,
            next: out.next.lease.map(lease_proto),
            shutdown: out.next.shutdown,
        }))
    }

    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseReply>, Status> {
        let r = request.into_inner();
        check_id("lease_id", &r.lease_id)?;
        check_len("reason", &r.reason, MAX_TEXT_LEN)?;
        let accepted = self.scheduler.release(&r.lease_id, &r.reason).await.map_err(status_of)?;
        Ok(Response::new(proto::ReleaseReply { accepted }))
    }

    async fn upload(
        &self,
        request: Request<tonic::Streaming<proto::UploadChunk>>,
    ) -> Result<Response<proto::UploadReply>, Status> {
        let stream = request.into_inner();
        Ok(Response::new(upload::receive(&self.scheduler, stream, self.limits.upload_idle).await?))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        Ok(Response::new(status::answer(&self.scheduler, self.started).await?))
    }

    type ReportStream = report::ReportStream;

    async fn report(
        &self,
        request: Request<proto::ReportRequest>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let query = ReportQuery::try_from(request.into_inner())?;
        Ok(Response::new(report::answer(&self.scheduler, query, self.limits.rpc).await?))
    }
}

/// An interceptor that requires `authorization: Bearer TOKEN` when `token` is set (and lets
/// everything through when it is `None`).
pub fn auth_interceptor(token: Option<String>) -> impl Interceptor + Clone + Send + Sync + 'static {
    let expected = token.map(|t| msae_shared::auth::bearer_text(&t));
    move |request: Request<()>| -> Result<Request<()>, Status> {
        let Some(expected) = &expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get(msae_shared::auth::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or wrong token (authorization: Bearer TOKEN)"))
        }
    }
}

/// Compares without an early exit, so response time does not leak how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Keepalive of accepted connections: an HTTP/2 ping every [`KEEPALIVE`], the connection (and
/// every call on it) closed when one is not answered within [`KEEPALIVE_ACK`]. A worker whose
/// machine vanished mid-call would otherwise keep its call, and what the call holds (a parked
/// lease request that would be granted the next trial), until the call's deadline at best.
/// TCP keepalive probes too, after [`KEEPALIVE`] of silence: NAT and firewall state on the way
/// stays alive, and the kernel notices a host that is gone.
pub const KEEPALIVE: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE`].
pub const KEEPALIVE_ACK: Duration = Duration::from_secs(20);

/// Serves the coordinator on `listener` (over TLS with `tls`) until `shutdown` resolves, every
/// call within `limits` ([`deadline`]). Connections get `TCP_NODELAY` (small request/reply
/// messages; Nagle would add delay to every round trip) and keepalive ([`KEEPALIVE`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    scheduler: SchedulerHandle,
    token: Option<String>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = edge::StatusEdge(tonic::service::interceptor::InterceptedService::new(
        deadline::Deadlines::new(
            CoordinatorServer::new(CoordinatorService::new(scheduler, limits))
                .max_decoding_message_size(edge::MAX_REQUEST_BYTES),
            limits,
        ),
        auth_interceptor(token),
    ));
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(KEEPALIVE));
    // Health answers without a token: probes and load balancers carry none.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_ACK));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
