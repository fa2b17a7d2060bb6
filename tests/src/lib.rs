//! Helpers for the end-to-end tests in `tests/`: real coordinator and worker processes on
//! 127.0.0.1, sweeps written to temporary directories, and polling with deadlines.

use msae_coordinator::model::{SweepRecord, TrialRecord, TrialStatus};
use msae_coordinator::service::ReportJson;
use msae_coordinator::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary of this crate (`e2e-coordinator`, `e2e-worker`).
pub fn bin(name: &str) -> PathBuf {
    // Integration tests run from target/<profile>/deps; the binaries sit one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join(name)
}

/// A loopback port that was free a moment ago (for a coordinator that must come back on the
/// same address after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Test certificates as PEM files in `dir`: a CA (`ca.pem`), a server certificate for
/// `localhost` signed by it (`server.pem`, `server.key`) and a client certificate signed by it
/// (`client.pem`, `client.key`).
pub fn write_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, host) in [("server", "localhost"), ("client", "worker")] {
        let key = KeyPair::generate().unwrap();
        let cert =
            CertificateParams::new(vec![host.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// Poll `f` every 50 ms until it returns Some, or panic with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A noop grid sweep of `n` points, each trial sleeping `sleep_ms`.
pub fn noop_sweep(name: &str, n: usize, sleep_ms: u64, max_attempts: u32) -> String {
    let seeds: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!(
        "name: {name}\nmethod: grid\nmax_attempts: {max_attempts}\n\
         task: {{kind: noop, sleep_ms: {sleep_ms}}}\nmetric: {{name: fvu, goal: minimize}}\n\
         parameters:\n  seed: {{values: [{}]}}\n",
        seeds.join(", ")
    )
}

/// Start a coordinator process; stdout/stderr go to files in `dir` for post-mortems.
pub fn spawn_coordinator(dir: &Path, sweep: &Path, db: &Path, port: u16, extra: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join(format!("coordinator-{}.log", unique()))).unwrap();
    Command::new(bin("e2e-coordinator"))
        .arg(sweep)
        .arg("--db")
        .arg(db)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--logdir", "none", "--quiet"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting e2e-coordinator")
}

/// Runs a coordinator process on `sweep` and `db` (an ephemeral port, one embedded worker) to
/// its end, with `extra` flags, and returns what it printed and its exit status.
pub fn run_to_end(sweep: &Path, db: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("e2e-coordinator"))
        .arg(sweep)
        .arg("--db")
        .arg(db)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .output()
        .expect("running e2e-coordinator")
}

/// Start a worker process against `127.0.0.1:port`.
pub fn spawn_worker(dir: &Path, port: u16, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("worker-{name}.log"))).unwrap();
    Command::new(bin("e2e-worker"))
        .args(["--coordinator", &format!("http://127.0.0.1:{port}"), "--name", name])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting e2e-worker")
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Ask a running coordinator for its records (the Report RPC, through the coordinator's own
/// client); `None` when it does not answer within 5 s.
pub fn report_rpc(port: u16) -> Option<ReportJson> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        let tls = msae_shared::tls::ClientTls::default();
        let fut = msae_coordinator::service::report::fetch_records(&url, None, None, &tls);
        tokio::time::timeout(Duration::from_secs(5), fut).await.ok()?.ok()
    })
}

/// Count trials of `status` in a report.
pub fn count(report: &ReportJson, status: TrialStatus) -> usize {
    report.trials.iter().filter(|t| t.status == status).count()
}

/// Every trial of every sweep in a database no process holds (opened read-write so a file left
/// by a killed coordinator is recovered first).
pub fn stored_trials(db: &Path) -> Vec<TrialRecord> {
    let store = Store::open(db).expect("opening the database after the coordinator exited");
    let mut out = Vec::new();
    for s in store.sweeps().unwrap() {
        out.extend(store.trials(&s.name).unwrap());
    }
    out
}

/// The sweeps of a database whose coordinator has exited.
pub fn stored_sweeps(db: &Path) -> Vec<SweepRecord> {
    Store::open(db).expect("opening the database after the coordinator exited").sweeps().unwrap()
}

/// Kill a child process with SIGKILL and reap it.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Send SIGTERM (the polite stop a scheduler sends).
pub fn sigterm(child: &Child) {
    signal(child, "TERM");
}

/// Freeze a process with SIGSTOP (a stalled machine: its connections stay open, it says
/// nothing).
pub fn sigstop(child: &Child) {
    signal(child, "STOP");
}

/// Resume a process frozen with [`sigstop`].
pub fn sigcont(child: &Child) {
    signal(child, "CONT");
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {} failed", child.id());
}

/// Runs `e2e-coordinator` with `args` (a subcommand such as `report`, `list`, `export`) to its
/// end.
pub fn coordinator_command(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(bin("e2e-coordinator")).args(args).output().expect("running e2e-coordinator")
}

/// SHA-256 of a file's bytes, to show that a command left it as it was.
pub fn file_digest(path: &Path) -> String {
    msae_shared::upload::sha256_hex(&std::fs::read(path).expect("reading a file to hash"))
}

/// Wait for a child to exit, killing it after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
