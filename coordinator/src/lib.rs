//! msae-coordinator: expands sweeps, leases trials to workers over gRPC, stores everything in
//! redb, writes TensorBoard logs and ranks results.
//!
//! - [`spec`]: the sweep YAML; [`search`]: strategies proposing points.
//! - [`model`]: stored records; [`store`]: redb; [`scheduler`]: leases, retries, resume.
//! - [`service`]: the gRPC service; [`tensorboard`]: event files; [`report`]: ranked results.

pub mod bench;
pub mod cli;
pub mod embedded;
pub mod model;
pub mod preflight;
pub mod progress;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod search;
pub mod service;
pub mod spec;
pub mod store;
pub mod tensorboard;
