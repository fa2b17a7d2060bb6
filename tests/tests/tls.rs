//! TLS through the real binaries: a coordinator serving TLS with an embedded worker (on its
//! loopback port) and a remote worker over https, then `status` over https.

use msae_coordinator::model::TrialStatus;
use msae_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_tls_coordinator_serves_local_and_remote_workers_and_status() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let sweep = dir.path().join("tls.yaml");
    std::fs::write(&sweep, noop_sweep("tls", 40, 250, 2)).unwrap();
    let db = dir.path().join("tls.redb");
    let port = free_port();
    let mut coordinator = spawn_coordinator(
        dir.path(),
        &sweep,
        &db,
        port,
        &["--tls-cert", &p("server.pem"), "--tls-key", &p("server.key")],
    );
    let log = std::fs::File::create(dir.path().join("remote.log")).unwrap();
    let mut remote = Command::new(bin("e2e-worker"))
        .args(["--coordinator", &format!("https://localhost:{port}"), "--name", "remote"])
        .args(["--tls-ca", &p("ca.pem")])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_until(Duration::from_secs(60), "status over https", || {
        let out = Command::new(bin("e2e-coordinator"))
            // The certificate names localhost; the address file holds the listening IP.
            .args(["status", "--coordinator", &format!("https://localhost:{port}")])
            .args(["--tls-ca", &p("ca.pem")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.success() && text.contains("remote") && text.contains("local")).then_some(text)
    });
    assert!(status.contains("workers (2):"), "{status}");
    let exit = wait_exit(&mut coordinator, Duration::from_secs(120), "the TLS sweep");
    assert!(exit.success());
    let _ = wait_exit(&mut remote, Duration::from_secs(30), "the remote worker");
    let trials = stored_trials(&db);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed), "{trials:#?}");
    let workers: std::collections::BTreeSet<_> =
        trials.iter().filter_map(|t| t.worker.clone()).collect();
    assert!(workers.contains("remote"), "the remote worker took trials over TLS: {workers:?}");
}
