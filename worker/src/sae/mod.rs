//! The modular sparse autoencoder: one model, three ways to train it.
//!
//! - [`model`]: the candle model ([`model::ModularSae`], trained through autograd by
//!   [`model::CandleTrainer`]): every configuration, the reference the hand-written paths are
//!   tested against, and the CUDA path. Its stages: [`topk`] (exact top-k masks),
//!   [`sparsity`] (the layer and stripe sparsity modes, the distortion), [`penalties`].
//! - [`classic`]: the classic one-layer top-k or dense SAE by hand, exploiting top-k sparsity.
//! - [`modular`]: every other CPU configuration by hand (intermediate layer, stripes, routing,
//!   penalties, JumpReLU, tied weights, SGD).
//! - Shared arithmetic, defined once: [`optim`] (the Adam/AdamW/SGD rules), [`linalg`] (the
//!   GEMM wrapper, transpose) and [`skinny`] (its direct loops for small-batch products, and
//!   products consumed row by row), [`kernels`] (SIMD vector kernels), [`model::initial_weights`]
//!   (the initialisation), [`topk`] (the top-k order).
//! - [`trainer`]: the `Trainer` trait all three implement.

pub mod classic;
mod duo;
pub use duo::share_the_cores;
pub(crate) mod kernels;
pub(crate) mod linalg;
pub mod model;
pub mod modular;
pub mod optim;
pub mod penalties;
mod skinny;
pub mod sparsity;
pub mod topk;
pub mod trainer;
