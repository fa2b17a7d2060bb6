//! What a user takes away from a sweep, through the real binaries: the trained SAE exported
//! byte for byte as its worker wrote it and applied to new data, and `status`, `list` and
//! `delete` against a coordinator process.

use msae_coordinator::model::TrialStatus;
use msae_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn cli(bin_name: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin(bin_name)).args(args).output().expect("running a binary")
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn exported_files_are_the_bytes_the_worker_wrote_and_encode_uses_them() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("keep.yaml");
    std::fs::write(
        &sweep,
        "name: keep\nmetric: {name: fvu, goal: minimize}\nmethod: grid\nkeep_weights: all\n\
         base: {steps: 40, eval_every: 20, data.synthetic.num_samples: 1024}\n\
         parameters:\n  lr: {values: [0.001, 0.01]}\n",
    )
    .unwrap();
    let db = dir.path().join("keep.redb");
    let worker_side = dir.path().join("worker-side");
    let out =
        run_to_end(&sweep, &db, &["--quiet", "--logdir", "none", "--artifacts", p(&worker_side)]);
    assert!(out.status.success(), "{}", text(&out));
    let trials = stored_trials(&db);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed && t.weights.is_some()));

    for (flag, index) in [(vec!["--trial", "0"], 0), (vec!["--best"], 1)] {
        let ex = dir.path().join(format!("export-{index}"));
        let mut args = vec!["export", "--db", p(&db), "--out", p(&ex)];
        args.extend(flag);
        let out = cli("e2e-coordinator", &args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(&format!("exported trial keep/{index}")), "{}", text(&out));
        for name in ["weights.safetensors", "config.yaml", "metrics.json"] {
            let exported = std::fs::read(ex.join(name)).unwrap();
            let written =
                std::fs::read(worker_side.join("keep").join(index.to_string()).join(name)).unwrap();
            assert!(exported == written, "trial {index}: {name} differs from the worker's");
        }
        // Exporting again into the same place refuses rather than overwrite.
        let again = cli("e2e-coordinator", &args);
        assert!(!again.status.success() && text(&again).contains("exists"), "{}", text(&again));
    }

    // The exported SAE encodes new data of the right width, and names the wrong width.
    let width = {
        let cfg = std::fs::read_to_string(dir.path().join("export-1/config.yaml")).unwrap();
        let cfg: msae_shared::TrialConfig = serde_yaml::from_str(&cfg).unwrap();
        cfg.data.synthetic.input_dim
    };
    let rows: Vec<f32> = (0..5 * width).map(|i| ((i * 7) % 11) as f32 / 11.0).collect();
    let data = dir.path().join("new.npy");
    let npy = msae_worker::data::npy::encode(
        "<f4",
        false,
        &[5, width],
        &msae_worker::data::npy::f32_bytes(&rows),
        1,
    );
    std::fs::write(&data, npy).unwrap();
    let weights = dir.path().join("export-1/weights.safetensors");
    let codes = dir.path().join("codes.npy");
    let out = cli(
        "e2e-worker",
        &["encode", "--weights", p(&weights), "--data", p(&data), "--out", p(&codes)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let m = msae_worker::data::npy::load_matrix(&codes).unwrap();
    assert_eq!(m.rows, 5);
    assert!(text(&out).contains("fvu"), "{}", text(&out));
}

#[test]
fn status_list_and_delete_against_a_coordinator_process() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("slow.yaml");
    std::fs::write(&sweep, noop_sweep("slow", 6, 400, 1)).unwrap();
    let db = dir.path().join("slow.redb");
    let port = free_port();
    let mut coordinator = spawn_coordinator(dir.path(), &sweep, &db, port, &[]);
    let status = wait_until(Duration::from_secs(60), "a running trial in status", || {
        let out = cli("e2e-coordinator", &["status", "--db", p(&db)]);
        let t = text(&out);
        (out.status.success() && t.contains("slow/")).then_some(t)
    });
    assert!(status.starts_with("sweep slow: "), "{status}");
    assert!(status.contains("workers (1):") && status.contains("1 running"), "{status}");

    // While it runs: list asks the coordinator; delete refuses and changes nothing.
    let listed = cli("e2e-coordinator", &["list", "--db", p(&db)]);
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(text(&listed).contains("slow") && text(&listed).contains("open"), "{}", text(&listed));
    let refused = cli("e2e-coordinator", &["delete", "slow", "--yes", "--db", p(&db)]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("running coordinator"), "{}", text(&refused));

    let exit = wait_exit(&mut coordinator, Duration::from_secs(120), "the sweep to finish");
    assert!(exit.success());
    let gone = cli("e2e-coordinator", &["status", "--db", p(&db)]);
    assert!(!gone.status.success(), "no coordinator runs any more: {}", text(&gone));
    let listed = cli("e2e-coordinator", &["list", "--db", p(&db)]);
    let row = text(&listed).lines().find(|l| l.starts_with("slow")).map(str::to_string);
    let cols: Vec<String> = row.unwrap().split_whitespace().map(String::from).collect();
    assert_eq!(cols[cols.len() - 7..], ["6", "6", "0", "0", "0", "0", "finished"], "{cols:?}");
    let files = dir.path().join("slow.weights/slow");
    assert!(files.join("0/weights.safetensors").exists(), "noop trials keep their stand-in files");
    let deleted = cli("e2e-coordinator", &["delete", "slow", "--yes", "--db", p(&db)]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(stored_sweeps(&db).is_empty() && !files.exists());
}
