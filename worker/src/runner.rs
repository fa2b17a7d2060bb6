//! The trial runner seam: the client loop and the standalone `train` command run trials through
//! [`TrialRunner`], so orchestration is testable without training (see [`NoopRunner`]).

use msae_shared::TrialConfig;
use msae_shared::class_stats::ClassStats;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a running trial reports every so often. Also renews the trial's lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    /// Scalars at this step (stable names from `msae_shared::metrics`).
    pub scalars: BTreeMap<String, f64>,
    /// An evaluation's per-class statistics, when its data has labels.
    pub class_stats: Option<ClassStats>,
    pub kind: ProgressKind,
}

/// What a progress report is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProgressKind {
    /// Sampled scalars (`train_loss`): the next report supersedes it.
    #[default]
    Sample,
    /// An evaluation (validation scalars): every one must reach the coordinator, at its step.
    Evaluation,
    /// The final metrics, at the final step; they travel as the trial's result, not as
    /// progress.
    Final,
}

/// The answer to a progress report.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Continue,
    /// Stop now (early stopping by the coordinator, cancellation, lease lost, shutdown).
    Stop(String),
}

/// The outcome of a trial that ran to the end (or stopped on request).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrialOutcome {
    /// Final metrics, stable names.
    pub metrics: BTreeMap<String, f64>,
    /// The final evaluation's per-class statistics, when its data has labels.
    pub class_stats: Option<ClassStats>,
    /// Directory holding the weights and the resolved config, when one was written.
    pub artifact: Option<PathBuf>,
    /// The trained SAE's files (weights, config, metrics), for a run that reached its end.
    pub files: Option<msae_shared::upload::TrialFiles>,
    /// Set when the trial stopped because `Control::Stop` was returned.
    pub stopped: Option<String>,
}

/// Options of a run that are not hyperparameters.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// CUDA device ordinal; None = CPU.
    pub gpu: Option<usize>,
    /// Write the trial's files (weights, resolved config, metrics) here.
    pub out_dir: Option<PathBuf>,
    /// The caller needs the trial's files in the outcome (the coordinator asked for them). A
    /// runner whose files cost little next to its training builds them either way; the noop
    /// runner, whose trial costs nothing, only when asked or when `out_dir` is set.
    pub files: bool,
}

/// Runs one trial. Implementations must call `progress` regularly (it renews leases) and stop
/// promptly when it returns [`Control::Stop`].
pub trait TrialRunner: Send + Sync {
    fn run(
        &self,
        config: &TrialConfig,
        options: &RunOptions,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> anyhow::Result<TrialOutcome>;

    /// Whether this trial finishes at once without blocking (microseconds of CPU, no I/O): the
    /// worker then runs it on its own task, instead of handing it to a blocking thread and
    /// back (two thread switches, more than such a trial costs).
    fn instant(&self, _config: &TrialConfig, _options: &RunOptions) -> bool {
        false
    }
}
