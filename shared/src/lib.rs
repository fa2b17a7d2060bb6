//! msae-shared: what the coordinator and the workers must agree on.
//!
//! - [`config`]: the one trial configuration type (every SAE hyperparameter), with serde
//!   defaults, unknown keys rejected, and [`config::TrialConfig::validate`].
//! - [`proto`]: the generated gRPC protocol (`proto/msae.proto`, package `msae.v1`).
//! - [`metrics`]: the stable metric names every trial reports, and [`metrics::TABLE`]: each
//!   metric's goal and whether the report and TensorBoard show it.
//! - [`class_stats`]: the per-class statistics of an evaluation over labelled data (stripe
//!   activations, routing scores, reconstruction error per class), kept apart from the metrics.
//! - [`runner`]: [`RunnerKind`], what a trial runs (`sae`, `noop`); a string only on the wire.
//! - [`auth`]: the shared-token header; [`suggest`]: "did you mean" for misspelt names.
//! - [`yaml`]: the one YAML entry point (duplicate keys refused with their location);
//!   [`logging`]: `tracing` setup; [`signal`]: shutdown signals, CPU accounting, exit codes and
//!   stdout that may close.

pub mod auth;
pub mod class_stats;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod runner;
pub mod signal;
pub mod suggest;
pub mod tls;
pub mod upload;
pub mod yaml;

/// Generated protocol code. Core logic converts to domain types at the edge.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("msae.v1");
}

/// Version of the coordinator/worker protocol; a worker with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

pub use config::{ConfigError, TrialConfig};
pub use runner::RunnerKind;
