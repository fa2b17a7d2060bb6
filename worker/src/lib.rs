//! msae-worker: the modular sparse autoencoder in candle and everything a worker does with it.
//!
//! - [`data`]: synthetic data and file loaders; [`eval`]: the metrics every trial reports.
//! - [`topk`], [`sparsity`], [`penalties`], [`model`], [`optim`]: the candle model.
//! - [`fast`]: a hand-written forward/backward for top-k SAEs, tested against [`model`].
//! - [`train`]: the training loop (standalone `msae-worker train`); [`bench`]: step timing.
//! - [`runner`], [`noop`], [`client`]: the trial-runner seam and the loop that leases trials.

pub mod bench;
pub mod cli;
pub mod client;
pub mod data;
pub mod eval;
pub mod fast;
mod linalg;
pub use msae_shared::logging;
pub mod model;
pub mod modular;
pub mod noop;
pub mod optim;
pub mod penalties;
pub mod runner;
pub mod sparsity;
pub mod topk;
pub mod train;
pub mod trainer;
