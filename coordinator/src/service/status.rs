//! The `Status` RPC: what a running coordinator is doing right now.

use crate::scheduler::SchedulerHandle;
use msae_shared::proto::{StatusReply, WorkerStatus};
use std::time::Instant;
use tonic::Status;

pub(super) async fn answer(
    scheduler: &SchedulerHandle,
    (started, final_then): (Instant, u64),
) -> Result<StatusReply, Status> {
    let workers = scheduler.workers().await.map_err(super::status_of)?;
    let c = scheduler.counts().borrow().clone();
    let uptime = started.elapsed().as_secs_f64();
    let finished_here = (c.completed + c.pruned + c.failed).saturating_sub(final_then);
    let (metric, goal) = scheduler.metric();
    Ok(StatusReply {
        sweep: c.sweep.clone(),
        total: c.total,
        queued: c.queued,
        running: c.running,
        completed: c.completed,
        pruned: c.pruned,
        failed: c.failed,
        workers: workers
            .into_iter()
            .map(|w| WorkerStatus {
                worker_id: w.id,
                name: w.name,
                device: w.device,
                trial: w.trial.unwrap_or_default(),
                last_seen_ms: w.last_seen_ms,
            })
            .collect(),
        metric: metric.to_string(),
        goal: goal.name().to_string(),
        best_index: c.best.map(|b| b.index),
        best_value: c.best.map_or(0.0, |b| b.value),
        trials_per_second: if uptime > 0.0 { finished_here as f64 / uptime } else { 0.0 },
        uptime_s: uptime,
        finished: c.finished,
    })
}
