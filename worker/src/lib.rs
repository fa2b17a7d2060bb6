//! msae-worker: the modular sparse autoencoder in candle and everything a worker does with it.
//!
//! - [`data`]: synthetic data and file loaders; [`eval`]: the metrics every trial reports,
//!   and per-class statistics on labelled data.
//! - [`sae`]: the modular SAE itself: the candle model (the reference and the CUDA path), the
//!   hand-written CPU training steps (classic and modular), their stages and optimisers.
//! - [`train`]: the training loop (standalone `msae-worker train`); [`bench`]: step timing.
//! - [`runner`], [`noop`], [`client`]: the trial-runner seam and the loop that leases trials.

pub mod artifact;
pub mod bench;
pub mod cli;
pub mod client;
pub mod data;
pub mod encode;
pub mod eval;
pub use msae_shared::logging;
pub mod noop;
pub mod runner;
pub mod sae;
pub mod train;
