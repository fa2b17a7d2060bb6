//! The `Upload` RPC: a finished trial's files, received under its live lease, checked, and
//! staged for its completion ([`crate::weights`]).
//!
//! Refused with a reply (nothing kept): a file over the size limit (permanent: a retry would
//! send the same file), a size or digest that does not match what arrived (worth a retry).
//! Refused with a status: no current lease (`not_found`), a malformed stream
//! (`invalid_argument`): an unknown or repeated file name, data before a file's first chunk,
//! more bytes than announced, a missing file. A stream that breaks off, one that sends nothing
//! for the idle limit (`deadline_exceeded`, [`super::deadline`]), or a handler dropped mid-way
//! (the call's deadline) leaves nothing: the partial directory is removed on every path but
//! success. The lease is not touched by a refused upload: the worker may send it again.

use crate::scheduler::SchedulerHandle;
use crate::weights::{FileDigest, WeightStore};
use msae_shared::proto::{UploadChunk, UploadReply};
use msae_shared::upload::{FILES, Sha256Hasher};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

/// The lease is renewed after every this many bytes: a long upload is not a silent worker.
const RENEW_EVERY: u64 = 64 << 20;

/// The client's chunks, each awaited at most `idle`: a stalled client must not keep the
/// partial directory (the whole upload has no limit: large files take minutes).
struct Chunks {
    stream: Streaming<UploadChunk>,
    idle: Duration,
}

impl Chunks {
    async fn next(&mut self) -> Result<Option<UploadChunk>, Status> {
        super::deadline::next_within("Upload", self.idle, &mut self.stream).await
    }
}

/// Removes the receiving directory unless the upload was staged.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The file being received.
struct Receiving {
    name: String,
    size: u64,
    sha256: String,
    written: u64,
    hasher: Sha256Hasher,
    file: tokio::fs::File,
}

/// What ends an upload early.
enum Refusal {
    /// Answered as a reply that is not accepted.
    Reply {
        reason: String,
        permanent: bool,
    },
    Status(Status),
}

impl From<Status> for Refusal {
    fn from(s: Status) -> Self {
        Refusal::Status(s)
    }
}

fn io_error(what: &str, e: std::io::Error) -> Refusal {
    Refusal::Status(Status::internal(format!("{what}: {e}")))
}

/// Receives one upload stream, waiting at most `idle` for each chunk.
pub(super) async fn receive(
    scheduler: &SchedulerHandle,
    stream: Streaming<UploadChunk>,
    idle: Duration,
) -> Result<UploadReply, Status> {
    let mut stream = Chunks { stream, idle };
    let Some(store) = scheduler.weights() else {
        return Err(Status::failed_precondition(
            "this sweep keeps no trial files (keep_weights: none); nothing to upload",
        ));
    };
    let first =
        stream.next().await?.ok_or_else(|| Status::invalid_argument("an upload with no chunks"))?;
    super::check_id("lease_id", &first.lease_id)?;
    let lease_id = first.lease_id.clone();
    let Some((sweep, index)) = scheduler.renew(&lease_id).await.map_err(super::status_of)? else {
        return Err(Status::not_found(
            "lease is not current (expired, completed or unknown); upload refused",
        ));
    };
    let dir = store.receiving(&lease_id);
    let _ = std::fs::remove_dir_all(&dir);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| Status::internal(format!("creating {}: {e}", dir.display())))?;
    let mut cleanup = Cleanup(Some(dir.clone()));
    match receive_files(scheduler, &store, &lease_id, &dir, first, &mut stream).await {
        Ok(files) => {
            store
                .stage(&lease_id, &files)
                .map_err(|e| Status::internal(format!("staging the upload: {e}")))?;
            cleanup.0 = None;
            tracing::info!(trial = %format!("{sweep}/{index}"), bytes = files.values().map(|f| f.size).sum::<u64>(), "trial files received");
            Ok(UploadReply { accepted: true, ..Default::default() })
        }
        Err(Refusal::Reply { reason, permanent }) => {
            tracing::warn!(trial = %format!("{sweep}/{index}"), %reason, "upload refused");
            Ok(UploadReply { accepted: false, reason, permanent })
        }
        Err(Refusal::Status(s)) => Err(s),
    }
}

async fn receive_files(
    scheduler: &SchedulerHandle,
    store: &Arc<WeightStore>,
    lease_id: &str,
    dir: &std::path::Path,
    first: UploadChunk,
    stream: &mut Chunks,
) -> Result<BTreeMap<String, FileDigest>, Refusal> {
    let mut done: BTreeMap<String, FileDigest> = BTreeMap::new();
    let mut current: Option<Receiving> = None;
    let mut since_renewal = 0u64;
    let mut next = Some(first);
    while let Some(chunk) = next {
        if !chunk.lease_id.is_empty() && chunk.lease_id != lease_id {
            return Err(Status::invalid_argument("an upload names one lease").into());
        }
        if !chunk.file.is_empty() {
            if let Some(r) = current.take() {
                finish(r, &mut done).await?;
            }
            current = Some(open(store, dir, &chunk, &done).await?);
        } else if chunk.size != 0 || !chunk.sha256.is_empty() {
            return Err(Status::invalid_argument(
                "size and sha256 belong on a file's first chunk (the one naming it)",
            )
            .into());
        }
        let Some(r) = current.as_mut() else {
            return Err(Status::invalid_argument("data before a file's first chunk").into());
        };
        let n = chunk.data.len() as u64;
        if r.written + n > r.size {
            return Err(Status::invalid_argument(format!(
                "{}: more bytes than the {} announced",
                r.name, r.size
            ))
            .into());
        }
        r.hasher.update(&chunk.data);
        r.file.write_all(&chunk.data).await.map_err(|e| io_error(&r.name, e))?;
        r.written += n;
        since_renewal += n;
        if since_renewal >= RENEW_EVERY {
            since_renewal = 0;
            if scheduler.renew(lease_id).await.map_err(super::status_of)?.is_none() {
                return Err(Status::not_found("the lease ended during the upload").into());
            }
        }
        next = stream.next().await?;
    }
    if let Some(r) = current.take() {
        finish(r, &mut done).await?;
    }
    if let Some(missing) = FILES.iter().find(|f| !done.contains_key(**f)) {
        return Err(Status::invalid_argument(format!("the upload has no {missing}")).into());
    }
    Ok(done)
}

async fn open(
    store: &WeightStore,
    dir: &std::path::Path,
    chunk: &UploadChunk,
    done: &BTreeMap<String, FileDigest>,
) -> Result<Receiving, Refusal> {
    let name = chunk.file.as_str();
    if !FILES.contains(&name) {
        return Err(Status::invalid_argument(format!(
            "unknown file {name:?}; an upload carries {}",
            FILES.join(", ")
        ))
        .into());
    }
    if done.contains_key(name) {
        return Err(Status::invalid_argument(format!("{name} sent twice")).into());
    }
    if chunk.size > store.limit {
        return Err(Refusal::Reply {
            reason: format!(
                "{name} is {} bytes, over the coordinator's limit of {} per file (msae-coordinator \
                 --max-upload-mb; or keep_weights: none)",
                chunk.size, store.limit
            ),
            permanent: true,
        });
    }
    let digest = chunk.sha256.as_str();
    if digest.len() != 64
        || !digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Status::invalid_argument(format!(
            "{name}: sha256 must be 64 lowercase hex digits"
        ))
        .into());
    }
    let path = dir.join(name);
    let file = tokio::fs::File::create(&path).await.map_err(|e| io_error(name, e))?;
    Ok(Receiving {
        name: name.to_string(),
        size: chunk.size,
        sha256: digest.to_string(),
        written: 0,
        hasher: Sha256Hasher::default(),
        file,
    })
}

async fn finish(mut r: Receiving, done: &mut BTreeMap<String, FileDigest>) -> Result<(), Refusal> {
    if r.written != r.size {
        return Err(Refusal::Reply {
            reason: format!("{}: {} bytes arrived of the {} announced", r.name, r.written, r.size),
            permanent: false,
        });
    }
    let got = r.hasher.finish_hex();
    if got != r.sha256 {
        return Err(Refusal::Reply {
            reason: format!("{}: the bytes that arrived do not match their sha256", r.name),
            permanent: false,
        });
    }
    r.file.flush().await.map_err(|e| io_error(&r.name, e))?;
    r.file.sync_all().await.map_err(|e| io_error(&r.name, e))?;
    done.insert(r.name, FileDigest { size: r.size, sha256: r.sha256 });
    Ok(())
}
