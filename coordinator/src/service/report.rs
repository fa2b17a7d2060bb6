//! The Report RPC in pieces, both ends.
//!
//! A whole sweep's records in one message outgrow tonic's 4 MB receive limit at a few thousand
//! trials, so the coordinator ranks and renders the report itself ([`Report::for_sweep`] and
//! [`Report::render`], the code `report` runs on a database file) and streams the text in
//! pieces of about [`CHUNK_BYTES`]. The client only concatenates and prints: sending the ranked
//! rows to be rendered again would cost the client as much as reading the file, twice over
//! for 100,000 trials. `--format json` gives the whole [`Report`] to tools.
//!
//! The `records` mode streams raw [`TrialRecord`]s as JSON arrays, for tools and tests that
//! need every trial's state (running, queued, leases).
//!
//! The work runs on a blocking thread that feeds a bounded channel, so a large report does not
//! hold a runtime thread, and records leave while later ones are still being encoded. A piece
//! waits at most the send limit (`--rpc-timeout`) for room: a client that stops reading ends
//! its report with `deadline_exceeded` instead of pinning the records on that thread.
//!
//! The client end: [`request_report`] (connect, authenticate, ask), then [`collect_text`],
//! [`collect_report`] or [`collect_records`]; [`fetch_text`] and [`fetch_records`] do both.

use super::{MAX_ID_LEN, ReportJson, check_len, check_name, status_of};
use crate::model::{Goal, SweepRecord, TrialRecord};
use crate::report::{
    Columns, ConfigColumns, MetricColumns, Report, ReportFormat, ReportOptions, pick_sweep,
};
use crate::scheduler::SchedulerHandle;
use anyhow::Context;
use msae_shared::proto;
use msae_shared::proto::report_chunk::Part;
use msae_shared::tls::ClientTls;
use serde::Serialize;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// JSON bytes per chunk: far below the 4 MB limit, yet a 100,000-trial report is only a few
/// dozen messages.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest message the report clients accept. Chunks stay near [`CHUNK_BYTES`], but a single
/// row or record is not split: a failed trial keeps every attempt's error (up to 1 MiB each).
pub const CLIENT_MAX_MESSAGE: usize = 64 << 20;

/// The reply stream of the Report RPC.
pub type ReportStream = Pin<Box<dyn Stream<Item = Result<proto::ReportChunk, Status>> + Send>>;

/// A validated Report request.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportQuery {
    /// The sweep; `None`: the most recently created.
    pub sweep: Option<String>,
    pub metric: Option<String>,
    pub goal: Option<Goal>,
    pub top: Option<usize>,
    /// Raw trial records instead of a ranked report.
    pub records: bool,
    pub format: ReportFormat,
    /// The metrics each row carries; `None`: the format's default.
    pub metrics: Option<MetricColumns>,
    /// How much of each trial's config the rows carry; `None`: the format's default.
    pub config: Option<ConfigColumns>,
}

/// Most bytes of the `metrics` field: room for a few hundred metric names.
const MAX_METRICS_LEN: usize = 64 * MAX_ID_LEN;

impl ReportQuery {
    /// A ranked report of the latest sweep in `format`, with that format's columns.
    pub fn new(format: ReportFormat) -> ReportQuery {
        ReportQuery {
            sweep: None,
            metric: None,
            goal: None,
            top: None,
            records: false,
            format,
            metrics: None,
            config: None,
        }
    }

    /// What the ranked report ranks by and shows.
    pub fn options(&self) -> ReportOptions {
        ReportOptions {
            top: self.top,
            metric: self.metric.clone(),
            goal: self.goal,
            columns: Columns::for_format(self.format, self.metrics.clone(), self.config),
        }
    }
}

impl TryFrom<proto::ReportRequest> for ReportQuery {
    type Error = Status;
    fn try_from(r: proto::ReportRequest) -> Result<Self, Status> {
        check_name("sweep", &r.sweep)?;
        check_name("metric", &r.metric)?;
        let goal = match r.goal.as_str() {
            "" => None,
            name => Some(Goal::from_name(name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "goal must be \"minimize\" or \"maximize\", got {:?}",
                    truncated(name)
                ))
            })?),
        };
        let top = match r.top {
            None => None,
            Some(0) => {
                return Err(Status::invalid_argument(
                    "top must be at least 1 (leave it out for every trial)",
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let format = match r.format.as_str() {
            "" => ReportFormat::Table,
            name => ReportFormat::from_name(name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "format must be \"table\", \"csv\" or \"json\", got {:?}",
                    truncated(name)
                ))
            })?,
        };
        let metrics = match r.metrics.as_str() {
            "" => None,
            text => {
                check_len("metrics", text, MAX_METRICS_LEN)?;
                // Checked whole: parsing trims the names, and a control character is refused
                // wherever it stands, as in every other name.
                for name in text.split(',') {
                    check_name("metrics", name)?;
                }
                Some(MetricColumns::parse(text).map_err(Status::invalid_argument)?)
            }
        };
        let config = match r.config.as_str() {
            "" => None,
            name => Some(ConfigColumns::from_name(name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "config must be \"swept\" or \"full\", got {:?}",
                    truncated(name)
                ))
            })?),
        };
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok(ReportQuery {
            sweep: some(r.sweep),
            metric: some(r.metric),
            goal,
            top,
            records: r.records,
            format,
            metrics,
            config,
        })
    }
}

/// The request that asks for `q` (what [`ReportQuery::try_from`] reads back).
impl From<&ReportQuery> for proto::ReportRequest {
    fn from(q: &ReportQuery) -> Self {
        proto::ReportRequest {
            sweep: q.sweep.clone().unwrap_or_default(),
            metric: q.metric.clone().unwrap_or_default(),
            goal: q.goal.map(|g| g.name().to_string()).unwrap_or_default(),
            top: q.top.map(|n| n as u64),
            records: q.records,
            format: q.format.name().to_string(),
            metrics: q.metrics.as_ref().map(MetricColumns::name).unwrap_or_default(),
            config: q.config.map(|c| c.name().to_string()).unwrap_or_default(),
        }
    }
}

/// A refused value quoted back, cut so an oversized one does not fill the status message.
fn truncated(s: &str) -> String {
    s.chars().take(MAX_ID_LEN).collect()
}

/// Answers a Report request: reads what it needs through `scheduler` and streams the reply,
/// each piece waiting at most `send_limit` for the client to make room.
pub async fn answer(
    scheduler: &SchedulerHandle,
    q: ReportQuery,
    send_limit: Duration,
) -> Result<ReportStream, Status> {
    if q.records {
        let mut sweeps = scheduler.sweeps().await.map_err(status_of)?;
        if let Some(name) = &q.sweep {
            sweeps.retain(|s| &s.name == name);
            if sweeps.is_empty() {
                return Err(Status::not_found(format!("no sweep named {name:?}")));
            }
        }
        let mut trials = Vec::new();
        for s in &sweeps {
            trials.extend(scheduler.records(&s.name).await.map_err(status_of)?);
        }
        return Ok(spawn_chunks(send_limit, move |out| {
            out.send(Part::SweepsJson(json(&sweeps)?))?;
            send_arrays(out, &trials, Part::RecordsJson)
        }));
    }
    // A ranked report reads the store's last commit (a redb snapshot, beside the scheduler's
    // writes), not the scheduler's memory: copying a large sweep's records out of the actor
    // would hold up every worker meanwhile. Every result and lease is committed before it is
    // acknowledged, so the commit is what workers have been told.
    let store = scheduler.store();
    let wanted = q.sweep.clone();
    let options = q.options();
    // The configs are most of a record: read only when the report shows them.
    let configs = options.columns.config == ConfigColumns::Full;
    let (sweep, trials) = tokio::task::spawn_blocking(move || {
        let sweeps = store.sweeps().map_err(|e| Status::internal(e.to_string()))?;
        let sweep = pick_sweep(&sweeps, wanted.as_deref()).map_err(Status::not_found)?.clone();
        let trials = if configs {
            store.trials(&sweep.name)
        } else {
            store.trials_without_configs(&sweep.name)
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok::<_, Status>((sweep, trials))
    })
    .await
    .map_err(|e| Status::internal(format!("reading the report: {e}")))??;
    Ok(spawn_chunks(send_limit, move |out| {
        let report = Report::for_sweep(&sweep, &trials, &options)
            .map_err(|e| Stop::Failed(Status::invalid_argument(e)))?;
        drop(trials);
        send_text(out, &report.render(q.format))
    }))
}

/// Why producing chunks stopped early.
enum Stop {
    /// The client went away: nothing to report.
    Gone,
    Failed(Status),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Failed(s)
    }
}

/// The sending end of the reply stream, used on a blocking thread.
struct Out {
    chunks: tokio::sync::mpsc::Sender<Result<proto::ReportChunk, Status>>,
    /// How long one piece may wait for room.
    limit: Duration,
    runtime: tokio::runtime::Handle,
}

impl Out {
    fn send(&self, part: Part) -> Result<(), Stop> {
        use tokio::sync::mpsc::error::SendTimeoutError;
        let chunk = proto::ReportChunk { part: Some(part) };
        // A blocking thread may wait on the runtime; the runtime's timer bounds the wait.
        match self.runtime.block_on(self.chunks.send_timeout(Ok(chunk), self.limit)) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(Stop::Gone),
            Err(SendTimeoutError::Timeout(_)) => Err(Stop::Failed(super::deadline::exceeded(
                "Report",
                self.limit,
                "the client took no piece of the reply; --rpc-timeout",
            ))),
        }
    }
}

/// Runs `produce` on a blocking thread, its chunks becoming the reply stream; each chunk waits
/// at most `limit` for room.
fn spawn_chunks(
    limit: Duration,
    produce: impl FnOnce(&Out) -> Result<(), Stop> + Send + 'static,
) -> ReportStream {
    // A few chunks in flight: encoding overlaps sending without buffering the whole report.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // The error that ends a failed report follows the queued chunks on a channel of its own,
    // so sending it never waits: the chunks' channel may be full (one way to fail is that).
    let (fail_tx, fail_rx) = tokio::sync::mpsc::channel(1);
    let out = Out { chunks: tx, limit, runtime: tokio::runtime::Handle::current() };
    tokio::task::spawn_blocking(move || {
        if let Err(Stop::Failed(status)) = produce(&out) {
            tracing::warn!(error = %status.message(), "report stream failed");
            let _ = fail_tx.try_send(Err(status));
        }
    });
    let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
    Box::pin(chunks.chain(tokio_stream::wrappers::ReceiverStream::new(fail_rx)))
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, Status> {
    serde_json::to_string(value).map_err(|e| Status::internal(format!("encoding the report: {e}")))
}

/// Sends `text` in pieces of about [`CHUNK_BYTES`], cut between characters.
fn send_text(out: &Out, mut text: &str) -> Result<(), Stop> {
    while !text.is_empty() {
        let mut end = text.len().min(CHUNK_BYTES);
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let (piece, rest) = text.split_at(end);
        out.send(Part::Text(piece.to_string()))?;
        text = rest;
    }
    Ok(())
}

/// Sends `items` as JSON arrays of about [`CHUNK_BYTES`] each (at least one item per array).
fn send_arrays<T: Serialize>(
    out: &Out,
    items: &[T],
    part: impl Fn(String) -> Part,
) -> Result<(), Stop> {
    let mut buf = String::from("[");
    for item in items {
        if buf.len() > 1 {
            buf.push(',');
        }
        buf.push_str(&json(item)?);
        if buf.len() >= CHUNK_BYTES {
            buf.push(']');
            out.send(part(std::mem::replace(&mut buf, String::from("["))))?;
        }
    }
    if buf.len() > 1 {
        buf.push(']');
        out.send(part(buf))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The client end

/// Asks the coordinator at `url` for `query` (as `Bearer token` when given): connects (5 s at
/// most; each call 30 s), and returns the reply stream for [`collect_text`], [`collect_report`]
/// or [`collect_records`]. The one Report client: `msae-coordinator report --coordinator` and
/// the end-to-end tests use it. Errors name the URL.
pub async fn request_report(
    url: &str,
    query: &ReportQuery,
    token: Option<&str>,
    tls: &ClientTls,
) -> anyhow::Result<tonic::Streaming<proto::ReportChunk>> {
    let channel = tls
        .endpoint(url)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    let mut client = proto::coordinator_client::CoordinatorClient::new(channel)
        .max_decoding_message_size(CLIENT_MAX_MESSAGE);
    let mut request = tonic::Request::new(proto::ReportRequest::from(query));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert(msae_shared::auth::AUTHORIZATION, msae_shared::auth::bearer(token)?);
    }
    let stream = client.report(request).await.map_err(|s| {
        anyhow::anyhow!("the coordinator at {url} refused the report: {}", s.message())
    })?;
    Ok(stream.into_inner())
}

/// The rendered report of `query` from the coordinator at `url` ([`request_report`]).
pub async fn fetch_text(
    url: &str,
    query: &ReportQuery,
    token: Option<&str>,
    tls: &ClientTls,
) -> anyhow::Result<String> {
    let stream = request_report(url, query, token, tls).await?;
    collect_text(stream)
        .await
        .with_context(|| format!("reading the report of the coordinator at {url}"))
}

/// Every stored record of `sweep` (`None`: of every sweep) from the coordinator at `url`
/// ([`request_report`] in `records` mode).
pub async fn fetch_records(
    url: &str,
    sweep: Option<&str>,
    token: Option<&str>,
    tls: &ClientTls,
) -> anyhow::Result<ReportJson> {
    let query = ReportQuery {
        sweep: sweep.map(str::to_string),
        records: true,
        ..ReportQuery::new(ReportFormat::Table)
    };
    let stream = request_report(url, &query, token, tls).await?;
    collect_records(stream)
        .await
        .with_context(|| format!("reading the records of the coordinator at {url}"))
}

/// Why a streamed report could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the coordinator refused the report: {}", .0.message())]
    Refused(tonic::Status),
    #[error("the coordinator sent a report this version cannot read ({0})")]
    Unreadable(String),
}

impl From<tonic::Status> for FetchError {
    fn from(s: tonic::Status) -> Self {
        FetchError::Refused(s)
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, FetchError> {
    serde_json::from_str(text).map_err(|e| FetchError::Unreadable(format!("{what}: {e}")))
}

/// The rendered report, reassembled from its pieces.
pub async fn collect_text(
    mut stream: tonic::Streaming<proto::ReportChunk>,
) -> Result<String, FetchError> {
    let mut text = String::new();
    while let Some(chunk) = stream.message().await? {
        match chunk.part {
            Some(Part::Text(piece)) => text.push_str(&piece),
            part => {
                return Err(FetchError::Unreadable(format!(
                    "unexpected piece {} of a report",
                    part_name(part.as_ref())
                )));
            }
        }
    }
    if text.is_empty() {
        return Err(FetchError::Unreadable("the reply holds no report".into()));
    }
    Ok(text)
}

/// A report in JSON format ([`collect_text`] of a `format: "json"` request), parsed.
pub async fn collect_report(
    stream: tonic::Streaming<proto::ReportChunk>,
) -> Result<Report, FetchError> {
    parse("report", &collect_text(stream).await?)
}

/// Reassembles the raw records of a `records` request.
pub async fn collect_records(
    mut stream: tonic::Streaming<proto::ReportChunk>,
) -> Result<ReportJson, FetchError> {
    let mut sweeps: Option<Vec<SweepRecord>> = None;
    let mut trials: Vec<TrialRecord> = Vec::new();
    while let Some(chunk) = stream.message().await? {
        match (chunk.part, &sweeps) {
            (Some(Part::SweepsJson(text)), None) => sweeps = Some(parse("sweeps", &text)?),
            (Some(Part::RecordsJson(text)), Some(_)) => {
                trials.extend(parse::<Vec<_>>("records", &text)?);
            }
            (part, _) => {
                return Err(FetchError::Unreadable(format!(
                    "unexpected piece {} of the records",
                    part_name(part.as_ref())
                )));
            }
        }
    }
    let sweeps =
        sweeps.ok_or_else(|| FetchError::Unreadable("the reply holds no sweeps".into()))?;
    Ok(ReportJson { sweeps, trials })
}

fn part_name(part: Option<&Part>) -> &'static str {
    match part {
        None => "(empty)",
        Some(Part::Text(_)) => "text",
        Some(Part::SweepsJson(_)) => "sweeps_json",
        Some(Part::RecordsJson(_)) => "records_json",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that stops reading: the producer gives up after the send limit (dropping what
    /// it held), and a client that comes back reads the queued pieces, then the deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_nobody_reads_ends_at_the_send_limit() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let limit = Duration::from_millis(200);
        let stream = spawn_chunks(limit, move |out| {
            let result = (0..100).try_for_each(|i| out.send(Part::Text(format!("piece {i}"))));
            done_tx.send(()).unwrap();
            result
        });
        let waited = tokio::task::spawn_blocking(move || {
            done_rx.recv_timeout(Duration::from_secs(20)).is_ok()
        });
        assert!(waited.await.unwrap(), "the producer stopped waiting for the client");
        let got: Vec<_> = stream.collect().await;
        let (last, pieces) = got.split_last().unwrap();
        assert_eq!(pieces.len(), 4, "the queued pieces are still delivered");
        assert!(pieces.iter().all(Result::is_ok));
        let status = last.as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("Report") && status.message().contains("200ms"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_that_is_read_arrives_whole() {
        let stream = spawn_chunks(Duration::from_millis(200), |out| {
            (0..50).try_for_each(|i| out.send(Part::Text(format!("{i},"))))
        });
        let got: Vec<_> = stream.collect().await;
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(Result::is_ok));
    }
}
