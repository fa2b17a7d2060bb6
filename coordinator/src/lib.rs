//! msae-coordinator: expands sweeps, leases trials to workers over gRPC, stores everything in
//! redb, writes TensorBoard logs and ranks results.
//!
//! - [`spec`]: the sweep YAML; [`search`]: strategies proposing points.
//! - [`model`]: stored records; [`store`]: redb; [`scheduler`]: leases, retries, resume;
//!   [`prune`]: the early termination rules the scheduler applies to evaluations.
//! - [`service`]: the gRPC service (and the one Report client); [`report`]: ranked results.
//! - [`tensorboard`]: event files, one run per trial, fed by the scheduler's events.
//! - [`run`]: running a sweep (all of the above together); [`cli`]: the command line;
//!   [`progress`]: the live status line; [`preflight`]: data files checked before the first
//!   trial; [`embedded`]: the one module that names the worker crate (local workers);
//!   [`bench`](mod@bench): orchestration and report benchmarks; [`manage`]: `list` and `delete`;
//!   [`health`]: the `health` probe command.
//!
//! What every metric is (name, goal, report and TensorBoard columns) lives in
//! [`msae_shared::metrics::TABLE`]; the trial config type in [`msae_shared::config`].

pub mod bench;
pub mod cli;
pub mod embedded;
pub mod export;
pub mod health;
pub mod manage;
pub mod model;
pub mod preflight;
pub mod progress;
pub mod prune;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod search;
pub mod service;
pub mod spec;
pub mod store;
pub mod tensorboard;
pub mod weights;
