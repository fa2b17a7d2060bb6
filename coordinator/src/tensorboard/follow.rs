//! Following a sweep: the task that feeds the scheduler's lossless event stream to a
//! [`TensorBoardLogger`], and the metrics its HParams experiment lists.

use super::TensorBoardLogger;
use crate::scheduler::{SchedulerEvent, SchedulerHandle};
use std::path::PathBuf;
use std::sync::Arc;

/// The metrics of a sweep's HParams experiment: the sweep metric, then the metric table's
/// TensorBoard rows ([`msae_shared::metrics::in_tensorboard`]).
pub fn experiment_metrics(sweep_metric: &str) -> Vec<String> {
    std::iter::once(sweep_metric)
        .chain(msae_shared::metrics::in_tensorboard().filter(|m| *m != sweep_metric))
        .map(str::to_string)
        .collect()
}

/// Writes TensorBoard events for the scheduler's sweep under `root` from its lossless event
/// stream: the sweep's HParams experiment first, then every evaluation (scalars and per-class
/// statistics) at its own step and final metrics at the final step. I/O errors are logged, not
/// fatal. The task ends, its files closed, when the stream does (the last scheduler handle is
/// gone).
pub fn spawn(
    scheduler: &SchedulerHandle,
    root: PathBuf,
    params: &[super::messages::HParamInfo],
    metric: &str,
) -> tokio::task::JoinHandle<()> {
    let sweep = scheduler.sweep_name();
    let logger = Arc::new(TensorBoardLogger::new(root, sweep, scheduler.sweep_id()));
    tracing::info!(%sweep, dir = %logger.sweep_dir().display(), "TensorBoard logs");
    if let Err(e) = logger.sweep_experiment(params, &experiment_metrics(metric)) {
        tracing::warn!("TensorBoard: {e}");
    }
    let mut events = scheduler.events_lossless();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let logger = logger.clone();
            let result = tokio::task::spawn_blocking(move || match event {
                SchedulerEvent::TrialStarted { record, .. } => logger.trial_started(&record),
                SchedulerEvent::TrialProgress { index, step, scalars, classes, .. } => {
                    logger.progress(index, step, &scalars, classes.as_deref())
                }
                SchedulerEvent::TrialFinished { record, classes } => {
                    logger.trial_finished(&record, classes.as_deref())
                }
            })
            .await;
            match result {
                Ok(Err(e)) => tracing::warn!("TensorBoard: {e}"),
                Err(e) => tracing::warn!("TensorBoard writer task failed: {e}"),
                Ok(Ok(())) => {}
            }
        }
        if let Err(e) = logger.close_all() {
            tracing::warn!("TensorBoard: {e}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use msae_shared::metrics;

    /// The metric table drives the HParams experiment: the sweep metric, then every row with
    /// `tensorboard: true`, in table order, each once.
    #[test]
    fn experiment_lists_the_sweep_metric_then_the_tables_tensorboard_rows() {
        let rows: Vec<&str> =
            metrics::TABLE.iter().filter(|m| m.tensorboard).map(|m| m.name).collect();
        for sweep_metric in ["my_score", metrics::MSE, metrics::MMCS] {
            let mut want = vec![sweep_metric];
            want.extend(rows.iter().filter(|m| **m != sweep_metric));
            assert_eq!(experiment_metrics(sweep_metric), want);
        }
        assert_eq!(experiment_metrics(metrics::FVU), [metrics::FVU, metrics::MSE, metrics::L0]);
    }
}
