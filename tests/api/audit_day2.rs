//! The audit trail over time (issue 19 §2): rotation by rename (with and
//! without SIGHUP, with compression), copytruncate, an audit FIFO whose reader
//! comes and goes, and secret and key files that are FIFOs or huge.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;
use crate::ops::{scrape, value};

/// Sends a signal to a process with the `kill` command.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits (bounded) until `cond` holds; false when the deadline passed.
async fn eventually(within: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Exchanges running in a loop on `tasks` tasks until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<(usize, usize)>>,
}

impl Load {
    fn start(issuer: &Issuer, url: &str, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let tasks = (0..tasks)
            .map(|_| {
                let (stop, issued) = (stop.clone(), issued.clone());
                let (url, token) = (url.to_string(), issuer.mint(&issuer.step()));
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let (mut ok, mut other) = (0, 0);
                    while !stop.load(Ordering::SeqCst) {
                        let r = post_exchange(&http, &url, &token, "artifact-api")
                            .await
                            .unwrap();
                        if r.status().as_u16() == 200 {
                            ok += 1;
                            issued.fetch_add(1, Ordering::SeqCst);
                        } else {
                            other += 1;
                        }
                    }
                    (ok, other)
                })
            })
            .collect();
        Self {
            stop,
            issued,
            tasks,
        }
    }

    /// Waits until `more` further tokens were issued.
    async fn issue(&self, more: usize) {
        let want = self.issued.load(Ordering::SeqCst) + more;
        let issued = self.issued.clone();
        let done = eventually(Duration::from_secs(30), async || {
            issued.load(Ordering::SeqCst) >= want
        })
        .await;
        assert!(done, "the load stalled: fewer than {more} tokens in 30 s");
    }

    /// Stops; returns (tokens issued, other answers).
    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let mut sum = (0, 0);
        for t in self.tasks {
            let (ok, other) = t.await.unwrap();
            sum = (sum.0 + ok, sum.1 + other);
        }
        sum
    }
}

/// The audit lines of `path`, decompressed when it ends in `.gz`.
fn lines_of(path: &Path) -> Vec<Value> {
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    } else {
        std::fs::read_to_string(path).unwrap()
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn audit line {l:?}: {e}")))
        .collect()
}

fn gzip(path: &Path) -> PathBuf {
    let ok = std::process::Command::new("gzip")
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
    PathBuf::from(format!("{}.gz", path.display()))
}

/// The service binary with Keycloak answering every token request; `audit`:
/// the `[audit]` table (`None`: the default file, `fsync` as given).
async fn service(
    audit: Option<String>,
    fsync: bool,
) -> (
    Issuer,
    FakeKeycloak,
    tempfile::TempDir,
    PathBuf,
    ServiceProcess,
) {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let mut opts = Options::new(&kc.uri());
    opts.top_extra = "watch_policies = false\nshutdown_grace_seconds = 8".into();
    opts.policies = vec![(
        "artifacts.yaml".into(),
        allow_policy(
            &when_repo(),
            "sts-artifacts",
            "artifact-api",
            "artifacts:read",
            "artifacts:read",
            300,
        ),
    )];
    opts.audit_fsync = fsync;
    opts.audit_toml = audit;
    let (dir, _toml, audit) = TestApp::write_config(&issuer, opts);
    let svc = ServiceProcess::start(&dir.path().join("sts.toml"), "info");
    (issuer, kc, dir, audit, svc)
}

/// Rotates the audit file twice by rename under load (each time: rename,
/// optionally SIGHUP, wait until the service writes the new file, compress the
/// old one), then counts: lines across all files == answers, exactly.
async fn rotate_under_load(fsync: bool, hup: bool) {
    let (issuer, _kc, _dir, audit, svc) = service(None, fsync).await;
    let base = format!("http://127.0.0.1:{}", svc.port);
    let load = Load::start(&issuer, &format!("{base}/token"), 6);
    let mut rotated = Vec::new();
    for round in 1..=2 {
        load.issue(40).await;
        let old = PathBuf::from(format!("{}.{round}", audit.display()));
        std::fs::rename(&audit, &old).unwrap();
        if hup {
            signal(svc.child.id(), "-HUP");
        }
        let moved_on = eventually(Duration::from_secs(10), async || {
            std::fs::metadata(&audit).is_ok_and(|m| m.len() > 0)
        })
        .await;
        assert!(
            moved_on,
            "round {round}: no audit line reached the new file within 10 s of the rename: \
             the service still writes to the renamed (soon compressed or deleted) file"
        );
        rotated.push(gzip(&old));
    }
    load.issue(40).await;
    let (issued, other) = load.stop().await;
    let mut lines = lines_of(&audit);
    for gz in &rotated {
        lines.extend(lines_of(gz));
    }
    let allowed = lines.iter().filter(|l| l["outcome"] == "allowed").count();
    assert_eq!(allowed, issued, "tokens issued vs their audit lines");
    assert_eq!(lines.len(), issued + other, "answers vs audit lines");
    let s = scrape(&base).await;
    let reopens = value(&s, "sts_audit_reopens_total", &[]);
    assert!(reopens >= 2.0, "sts_audit_reopens_total = {reopens}");
    assert_eq!(value(&s, "sts_audit_available", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_rename_under_load_then_compress_loses_no_audit_line() {
    rotate_under_load(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_rename_and_sighup_through_the_writer_thread_loses_no_audit_line() {
    // `fsync = true`: the writer thread's path.
    rotate_under_load(true, true).await;
}

#[tokio::test]
async fn sighup_reopens_the_audit_file_even_when_the_policy_reload_fails() {
    let (_issuer, _kc, dir, audit, svc) = service(None, false).await;
    let base = format!("http://127.0.0.1:{}", svc.port);
    // A policy file that does not compile: the reload on SIGHUP fails.
    std::fs::write(
        dir.path().join("policies/broken.yaml"),
        "effect: sometimes\n",
    )
    .unwrap();
    std::fs::rename(&audit, dir.path().join("audit.jsonl.1")).unwrap();
    signal(svc.child.id(), "-HUP");
    let reopened = eventually(Duration::from_secs(10), async || {
        value(
            &scrape(&base).await,
            "sts_audit_reopens_total",
            &[("reason", "signal")],
        ) >= 1.0
    })
    .await;
    assert!(reopened, "SIGHUP did not reopen the audit file");
    assert!(audit.exists(), "the reopened audit path was not created");
    // Once the policy reloader listens too: its failure does not hold the reopen.
    signal(svc.child.id(), "-HUP");
    let both = eventually(Duration::from_secs(10), async || {
        let s = scrape(&base).await;
        value(&s, "sts_audit_reopens_total", &[("reason", "signal")]) >= 2.0
            && value(&s, "sts_policy_reloads_total", &[("result", "error")]) >= 1.0
    })
    .await;
    assert!(
        both,
        "a second SIGHUP: no reopen next to the failed policy reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copytruncate_leaves_no_torn_line_and_no_nul_hole() {
    let (issuer, _kc, dir, audit, svc) = service(None, false).await;
    let base = format!("http://127.0.0.1:{}", svc.port);
    let load = Load::start(&issuer, &format!("{base}/token"), 6);
    load.issue(40).await;
    // logrotate's copytruncate: copy, then truncate in place (lines written in
    // between are lost: documented as lossy).
    let copy = dir.path().join("audit.jsonl.1");
    std::fs::copy(&audit, &copy).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&audit)
        .unwrap()
        .set_len(0)
        .unwrap();
    load.issue(40).await;
    load.stop().await;
    let bytes = std::fs::read(&audit).unwrap();
    assert!(
        !bytes.contains(&0),
        "a NUL hole: the audit file is not opened O_APPEND"
    );
    assert!(!lines_of(&audit).is_empty());
    let copied = std::fs::read_to_string(&copy).unwrap();
    for l in copied.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        serde_json::from_str::<Value>(l).unwrap();
    }
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// `GET /readyz`: status and body.
async fn readyz(base: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// A log shipper reading the FIFO `fifo` into `out` (`cat`).
fn reader(fifo: &Path, out: &Path) -> std::process::Child {
    std::process::Command::new("cat")
        .arg(fifo)
        .stdout(std::fs::File::create(out).unwrap())
        .spawn()
        .unwrap()
}

async fn exchange_status(issuer: &Issuer, base: &str) -> u16 {
    let http = reqwest::Client::new();
    let token = issuer.mint(&issuer.step());
    let r = post_exchange(&http, &format!("{base}/token"), &token, "artifact-api")
        .await
        .unwrap();
    let status = r.status().as_u16();
    if status != 200 {
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error_code"], "audit.unavailable", "{body}");
        assert!(body.get("access_token").is_none());
    }
    status
}

/// Waits until `out` holds an `allowed` audit line.
async fn shipped(out: &Path) -> bool {
    eventually(Duration::from_secs(10), async || {
        std::fs::read_to_string(out)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("\"outcome\":\"allowed\""))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_fifo_without_a_reader_blocks_neither_startup_nor_sigterm_and_withholds_tokens() {
    let fifos = tempfile::tempdir().unwrap();
    let fifo = fifos.path().join("audit.fifo");
    mkfifo(&fifo);
    let table = format!(
        "[audit]\npath = \"{}\"\nreopen_interval_ms = 50",
        fifo.display()
    );
    // Startup does not wait for a reader.
    let (issuer, _kc, _dir, _audit, mut svc) = service(Some(table), false).await;
    let base = format!("http://127.0.0.1:{}", svc.port);
    let (status, body) = readyz(&base).await;
    assert_eq!(
        (status, &body["reason"]),
        (503, &Value::from("audit.unavailable"))
    );
    assert_eq!(exchange_status(&issuer, &base).await, 503);
    assert_eq!(value(&scrape(&base).await, "sts_audit_available", &[]), 0.0);
    // A denial's line, queued while nobody reads, is lost and counted (the
    // newcomer review found it lost uncounted).
    let denied = reqwest::Client::new()
        .post(format!("{base}/token"))
        .form(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", "not-a-token"),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", "artifact-api"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status().as_u16(), 400);
    let counted = eventually(Duration::from_secs(10), async || {
        value(
            &scrape(&base).await,
            "sts_audit_failures_total",
            &[("outcome", "denied")],
        ) >= 1.0
    })
    .await;
    assert!(counted, "a lost denial line was not counted");
    // The log shipper starts: ready without a restart, tokens are audited.
    let out = fifos.path().join("shipped-1.jsonl");
    let mut cat = reader(&fifo, &out);
    let ready = eventually(Duration::from_secs(10), async || {
        readyz(&base).await.0 == 200
    })
    .await;
    assert!(ready, "/readyz did not become 200 once a reader was there");
    assert_eq!(exchange_status(&issuer, &base).await, 200);
    assert!(
        shipped(&out).await,
        "the issued token's line did not reach the reader"
    );
    let s = scrape(&base).await;
    assert_eq!(value(&s, "sts_audit_available", &[]), 1.0);
    assert!(value(&s, "sts_audit_reopens_total", &[("reason", "retry")]) >= 1.0);
    // The reader goes away: the next line meets EPIPE, the reopen finds no
    // reader: the token is withheld and readiness follows.
    cat.kill().unwrap();
    cat.wait().unwrap();
    assert_eq!(exchange_status(&issuer, &base).await, 503);
    assert_eq!(readyz(&base).await.0, 503);
    // Another reader: back again.
    let out = fifos.path().join("shipped-2.jsonl");
    let mut cat = reader(&fifo, &out);
    let ready = eventually(Duration::from_secs(10), async || {
        readyz(&base).await.0 == 200
    })
    .await;
    assert!(ready, "/readyz did not become 200 for the second reader");
    assert_eq!(exchange_status(&issuer, &base).await, 200);
    assert!(shipped(&out).await);
    // A reader that stops reading: the pipe fills; SIGTERM still stops the process.
    cat.kill().unwrap();
    cat.wait().unwrap();
    let _stalled = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let http = reqwest::Client::new();
    let garbage = [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", "not-a-token"),
        ("subject_token_type", ID_TOKEN_TYPE),
        ("audience", "artifact-api"),
    ];
    for _ in 0..400 {
        let r = http
            .post(format!("{base}/token"))
            .form(&garbage)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
    }
    signal(svc.child.id(), "-TERM");
    let stopped = eventually(Duration::from_secs(15), async || {
        svc.child.try_wait().unwrap().is_some()
    })
    .await;
    assert!(stopped, "SIGTERM did not stop the process within 15 s");
}

/// Loads `toml` in a thread; `None` when it did not finish within 10 s.
fn load_bounded(toml: String, base: PathBuf) -> Option<Result<(), String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = keycloak_ci_sts::configuration::Settings::from_toml_str(&toml, &base)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(10)).ok()
}

#[tokio::test]
async fn secret_and_key_files_that_are_fifos_or_huge_are_refused_without_blocking() {
    let issuer = Issuer::start().await;
    for (file, kind) in [
        ("artifacts.secret", "fifo"),
        ("signing.pem", "fifo"),
        ("identity.pem", "fifo"),
        ("artifacts.secret", "huge"),
        ("signing.pem", "huge"),
    ] {
        let (dir, toml, _) = TestApp::write_config(&issuer, Options::new("http://127.0.0.1:1"));
        let path = dir.path().join(file);
        std::fs::remove_file(&path).unwrap();
        let want = if kind == "fifo" {
            mkfifo(&path);
            "not a regular file"
        } else {
            // 16 MiB, sparse: no disk used.
            std::fs::File::create(&path)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
            "larger than"
        };
        let result = load_bounded(toml, dir.path().to_path_buf())
            .unwrap_or_else(|| panic!("{file} as a {kind}: reading the configuration blocked"));
        let err = result.expect_err(&format!("{file} as a {kind} was accepted"));
        assert!(err.contains(want), "{file} as a {kind}: {err}");
        assert!(
            err.contains(file),
            "{file} as a {kind}: the error names the file: {err}"
        );
    }
}
