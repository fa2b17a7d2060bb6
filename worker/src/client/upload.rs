//! The trial's files go to the coordinator before its result, when the lease asks: streamed in
//! chunks, each file with its size and SHA-256, so the coordinator keeps them only whole.

use super::edge::{LeasedTrial, TrialResult, Verdict};
use super::retry::{is_transient, timed};
use super::worker::Worker;
use msae_shared::proto::{UploadChunk, UploadReply};
use msae_shared::upload::{CHUNK_BYTES, TrialFiles, sha256_hex};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

/// Refused uploads (a digest that did not match, say) tried again before the trial fails.
const REFUSALS_TRIED: u32 = 3;

/// The chunks of an upload: each file's first chunk names it and gives its size and digest;
/// the stream's first chunk names the lease.
pub(super) fn chunks(
    lease_id: String,
    files: Arc<TrialFiles>,
    digests: Arc<[String; 3]>,
) -> impl Iterator<Item = UploadChunk> + Send + 'static {
    (0..3).flat_map(move |i| {
        let (files, digests, lease_id) = (files.clone(), digests.clone(), lease_id.clone());
        let len = files.files()[i].1.len();
        (0..len.div_ceil(CHUNK_BYTES).max(1)).map(move |c| {
            let (name, bytes) = files.files()[i];
            let part = &bytes[c * CHUNK_BYTES..len.min((c + 1) * CHUNK_BYTES)];
            let first = c == 0;
            UploadChunk {
                lease_id: if first && i == 0 { lease_id.clone() } else { String::new() },
                file: if first { name.to_string() } else { String::new() },
                size: if first { len as u64 } else { 0 },
                sha256: if first { digests[i].clone() } else { String::new() },
                data: part.to_vec(),
            }
        })
    })
}

fn human(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl Worker {
    /// Uploads the files of a completed trial when its lease asks for them, and returns the
    /// result to report: unchanged, or a failure when the files cannot be stored.
    pub(super) async fn upload_files(
        &self,
        trial: &LeasedTrial,
        result: TrialResult,
    ) -> TrialResult {
        let Some(limit) = trial.upload_limit else { return result };
        if result.verdict != Verdict::Completed {
            return result;
        }
        let lease = &trial.lease;
        let fail = |error: String, permanent: bool| TrialResult {
            verdict: Verdict::Failed { error, permanent },
            ..result.clone()
        };
        let Some(files) = result.files.clone() else {
            return fail("the trial produced no files to upload".into(), false);
        };
        if let Some((name, bytes)) = files.files().into_iter().find(|(_, b)| b.len() as u64 > limit)
        {
            return fail(
                format!(
                    "{name} is {}, over the coordinator's upload limit of {} (raise \
                     msae-coordinator --max-upload-mb, or set keep_weights: none)",
                    human(bytes.len() as u64),
                    human(limit)
                ),
                true,
            );
        }
        let digests = {
            let files = files.clone();
            let digest = move || files.files().map(|(_, b)| sha256_hex(b));
            match tokio::task::spawn_blocking(digest).await {
                Ok(d) => Arc::new(d),
                Err(e) => return fail(format!("hashing the trial's files: {e}"), false),
            }
        };
        let mut backoff = self.backoff();
        let mut refusals = 0;
        loop {
            let stream =
                tokio_stream::iter(chunks(lease.lease_id.clone(), files.clone(), digests.clone()));
            let mut client = self.client.clone();
            // Large files take time: the limit grows with the size.
            let limit = self.opts.rpc_timeout + Duration::from_secs(files.total_bytes() >> 20);
            let reply: Result<UploadReply, Status> = timed(limit, client.upload(stream)).await;
            match reply {
                Ok(r) if r.accepted => {
                    tracing::info!(trial = %lease.trial_id, bytes = files.total_bytes(), "files uploaded");
                    return result;
                }
                Ok(r) if r.permanent => return fail(r.reason, true),
                Ok(r) => {
                    refusals += 1;
                    if refusals >= REFUSALS_TRIED {
                        return fail(format!("uploading the trial's files: {}", r.reason), false);
                    }
                    tracing::warn!(trial = %lease.trial_id, reason = %r.reason, "upload refused; trying again");
                }
                Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                    // The lease is gone: the result will be refused as stale, as without files.
                    tracing::warn!(trial = %lease.trial_id, message = s.message(), "lease lost before the upload");
                    return result;
                }
                Err(s) if !is_transient(&s) => {
                    return fail(format!("uploading the trial's files: {}", s.message()), false);
                }
                Err(s) => {
                    if self.shutdown.is_set() {
                        return fail(
                            format!("uploading the trial's files: {}", s.message()),
                            false,
                        );
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(trial = %lease.trial_id, code = ?s.code(), message = s.message(),
                        retry_in = ?delay, "cannot upload the trial's files yet");
                    self.sleep_or_shutdown(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_name_each_file_once_and_reassemble_to_its_bytes() {
        let files = TrialFiles {
            weights: (0..(2 * CHUNK_BYTES + 5)).map(|i| i as u8).collect(),
            config_yaml: b"lr: 0.001\n".to_vec(),
            metrics_json: Vec::new(),
        };
        let digests = files.files().map(|(_, b)| sha256_hex(b));
        let all: Vec<UploadChunk> =
            chunks("L7".into(), Arc::new(files.clone()), Arc::new(digests.clone())).collect();
        assert_eq!(all.len(), 3 + 1 + 1, "an empty file still gets its one chunk");
        assert_eq!(all[0].lease_id, "L7");
        assert!(all[1..].iter().all(|c| c.lease_id.is_empty()));
        let named: Vec<&str> =
            all.iter().filter(|c| !c.file.is_empty()).map(|c| c.file.as_str()).collect();
        assert_eq!(named, msae_shared::upload::FILES);
        let weights: Vec<u8> = all[..3].iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(weights, files.weights);
        assert_eq!((all[0].size, all[0].sha256.as_str()), (weights.len() as u64, &*digests[0]));
        assert!(all.iter().all(|c| c.data.len() <= CHUNK_BYTES));
    }
}
