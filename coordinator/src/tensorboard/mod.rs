//! TensorBoard event files, written without TensorFlow: scalars per trial, per-class
//! statistics per stripe, plus the HParams plugin's experiment / session summaries, so
//! `tensorboard --logdir ROOT/SWEEP-ID` shows every trial's curves and the HParams table of a
//! sweep.
//!
//! - [`record`]: TFRecord framing (length, data and their masked CRC32C).
//! - [`messages`]: the protobuf messages (`tensorboard.Event`, summaries, HParams plugin data).
//! - [`event_file`]: one event file: [`EventWriter`], and [`read_events`] to read one back.
//! - [`class_runs`]: per-class statistics as runs and tags (per-stripe runs).
//! - [`logger`]: [`TensorBoardLogger`], the runs and HParams sessions of every trial of a sweep.
//! - [`follow`]: the task that feeds the scheduler's events to a logger.
//!
//! # Layout
//! `{root}/{sweep}-{id}/{layer_sparsity_mode}/{stripe_sparsity_mode}/trial-{index:05}` holds one
//! trial (the original code logged under `[log_dir]/[layer mode]/[stripe mode]/[timestamp]`),
//! and `.../trial-{index:05}/stripe_{s}` each of its stripes (the original's per-stripe
//! writers); `{root}/{sweep}-{id}` holds the HParams experiment summary. `id` is the sweep's
//! stable id, so same-named sweeps of different databases stay apart. The HParams plugin looks
//! for the experiment in any run, so TensorBoard may point at `{root}/{sweep}-{id}` or at
//! `{root}`.
//!
//! Writing never panics on I/O errors: every call returns a [`Result`] and the caller logs.

pub mod class_runs;
pub mod event_file;
pub mod follow;
pub mod logger;
pub mod messages;
pub mod record;

pub use event_file::{EventWriter, read_events};
pub use logger::TensorBoardLogger;
use std::path::PathBuf;

/// Errors of the TensorBoard writer. All are I/O or format problems; none is worth retrying
/// in a loop (a later call may succeed once the disk has room again).
#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    /// A log directory could not be created.
    #[error("tensorboard: cannot create directory {path}: {error}")]
    CreateDir { path: PathBuf, error: std::io::Error },
    /// An event file could not be created, written or flushed.
    #[error("tensorboard: cannot write event file {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    /// An event file could not be read back.
    #[error("tensorboard: cannot read event file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    /// A record is truncated, has a bad CRC or does not decode as an `Event`.
    #[error("tensorboard: malformed record at byte {offset}: {reason}")]
    Corrupt { offset: usize, reason: String },
}

/// Result alias of this module.
pub type Result<T, E = TensorBoardError> = std::result::Result<T, E>;

/// Replaces path separators and anything unusual so a sweep name or mode cannot escape `root`.
fn sanitize(component: &str) -> String {
    let s: String = component
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') { "_".to_string() } else { s }
}

fn unix_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
