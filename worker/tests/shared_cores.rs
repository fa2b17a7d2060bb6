//! A process whose trainers share the cores never starts the step helper thread. Its own test
//! binary: the switch is process-wide.

use msae_shared::config::TrialConfig;
use msae_worker::sae::modular::ModularFast;
use msae_worker::sae::trainer::Trainer;

fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == name)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn shared_cores_keep_small_steps_on_the_calling_thread() {
    if !std::path::Path::new("/proc/self/task").exists() || rayon::current_num_threads() < 2 {
        return; // Nothing to observe: no /proc, or a single thread never starts the helper.
    }
    msae_worker::sae::share_the_cores();
    let yaml = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/configs/L-none_S-none.yaml");
    let cfg = TrialConfig::from_yaml(&std::fs::read_to_string(yaml).unwrap()).unwrap();
    let mut trainer = ModularFast::new(&cfg, 784).unwrap();
    let batch: Vec<f32> = (0..8 * 784).map(|i| (i % 13) as f32 / 13.0).collect();
    for step in 0..3 {
        trainer.step(&batch, step).unwrap();
    }
    assert_eq!(threads_named("msae-duo"), 0, "the helper thread was started");
}
