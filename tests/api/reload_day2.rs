//! Issue 19 §1: policies that change underneath the running service — a
//! swapped `current` link, the Kubernetes ConfigMap (`..data`) layout, a file
//! rewritten in place while the reload fires, a FIFO named like a policy — and
//! the applied set's digest.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::ops::{scrape, value};

/// Injected reload intervals: the poll fallback and the settle interval.
const POLL_MS: u64 = 100;
const SETTLE_MS: u64 = 20;
/// The documented delay with the intervals above (poll + settle debounce + two
/// reads `settle_ms` apart), with room for a busy machine.
const APPLIED_WITHIN: Duration = Duration::from_secs(10);

pub(crate) fn policy_for(audience: &str) -> String {
    allow_policy(
        &when_repo(),
        "sts-artifacts",
        audience,
        "artifacts:read",
        "artifacts:read",
        300,
    )
}

fn reload_table(watch: bool, poll_ms: u64, settle_ms: u64) -> String {
    format!(
        "watch_policies = {watch}\n\n[policies]\npoll_ms = {poll_ms}\nsettle_ms = {settle_ms}\n"
    )
}

/// Status of an exchange of `token` for `audience`.
pub(crate) async fn status(app: &TestApp, token: &str, audience: &str) -> u16 {
    app.exchange(token, audience, None).await.status().as_u16()
}

/// Waits (bounded) until `audience` is granted and `gone` is not.
async fn applied(app: &TestApp, token: &str, audience: &str, gone: &str) -> bool {
    let deadline = Instant::now() + APPLIED_WITHIN;
    while Instant::now() < deadline {
        if status(app, token, audience).await == 200 && status(app, token, gone).await == 400 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The `digest` label of the one `sts_policy_set_info` series (asserts there is one).
async fn set_digest(address: &str) -> String {
    let s = scrape(address).await;
    let series: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "sts_policy_set_info")
        .collect();
    assert_eq!(series.len(), 1, "exactly one sts_policy_set_info series");
    let d = series[0]
        .labels
        .get("digest")
        .unwrap_or_default()
        .to_string();
    assert_eq!(d.len(), 64, "a sha256 digest in hex: {d}");
    d
}

/// The set's digest once it differs from `before`, waiting up to
/// [`APPLIED_WITHIN`]: the metric follows the applied set after its log line,
/// so a request can see the new set a moment before a scrape does.
async fn digest_after(address: &str, before: &str) -> String {
    let deadline = Instant::now() + APPLIED_WITHIN;
    loop {
        let now = set_digest(address).await;
        if now != before || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn release(root: &Path, n: u32) {
    let dir = root.join(format!("release-{n}"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), policy_for(&format!("rel-{n}-api"))).unwrap();
}

/// `ln -sfn release-N current` in `root`, as git-sync's `--link` or a deploy script does.
fn flip(root: &Path, n: u32) {
    let ok = std::process::Command::new("ln")
        .args(["-sfn", &format!("release-{n}"), "current"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A service whose `policies_dir` is `<root>/current -> release-1`, with the
/// upstreams it uses (kept alive).
async fn linked(watch: bool, poll_ms: u64) -> ((Issuer, FakeKeycloak), tempfile::TempDir, TestApp) {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1..).await;
    let root = tempfile::tempdir().unwrap();
    release(root.path(), 1);
    flip(root.path(), 1);
    let mut opts = Options::new(&kc.uri());
    opts.policies_dir = Some(root.path().join("current"));
    opts.top_extra = reload_table(watch, poll_ms, SETTLE_MS);
    let app = TestApp::start(&issuer, opts).await;
    ((issuer, kc), root, app)
}

/// Three consecutive `current -> release-N` swaps with the old target kept,
/// then three with the old target deleted; each applied within the delay, and
/// the digest metric follows each one.
async fn three_swaps_each_way(watch: bool, poll_ms: u64) {
    let (upstreams, root, app) = linked(watch, poll_ms).await;
    let issuer = &upstreams.0;
    let token = issuer.mint(&issuer.step());
    assert_eq!(status(&app, &token, "rel-1-api").await, 200);
    let mut digest = set_digest(&app.address).await;
    for n in 2..=7 {
        release(root.path(), n);
        flip(root.path(), n);
        if n > 4 {
            std::fs::remove_dir_all(root.path().join(format!("release-{}", n - 1))).unwrap();
        }
        let (new, old) = (format!("rel-{n}-api"), format!("rel-{}-api", n - 1));
        assert!(
            applied(&app, &token, &new, &old).await,
            "swap to release-{n} (old target {}) not applied within {APPLIED_WITHIN:?}",
            if n > 4 { "deleted" } else { "kept" }
        );
        let now = digest_after(&app.address, &digest).await;
        assert_ne!(now, digest, "the digest changes with the set");
        digest = now;
    }
}

#[tokio::test]
async fn link_swaps_are_applied_by_the_watch_alone() {
    three_swaps_each_way(true, 0).await;
}

/// `policies_dir` is a link (git-sync's `current`): a file changed inside its
/// target, before and after a swap, is applied by the watch alone. The watch is
/// on the resolved directory: one on the link's own path sees no such edit.
#[tokio::test]
async fn edits_inside_a_linked_directory_are_applied_by_the_watch_alone() {
    let (upstreams, root, app) = linked(true, 0).await;
    let issuer = &upstreams.0;
    let token = issuer.mint(&issuer.step());
    let edit = |n: u32, audience: &str| {
        let dir = root.path().join(format!("release-{n}"));
        std::fs::write(dir.join("a.yaml.tmp"), policy_for(audience)).unwrap();
        std::fs::rename(dir.join("a.yaml.tmp"), dir.join("a.yaml")).unwrap();
    };
    edit(1, "edited-1-api");
    assert!(
        applied(&app, &token, "edited-1-api", "rel-1-api").await,
        "an edit inside the link's target not applied"
    );
    release(root.path(), 2);
    flip(root.path(), 2);
    assert!(applied(&app, &token, "rel-2-api", "edited-1-api").await);
    edit(2, "edited-2-api");
    assert!(
        applied(&app, &token, "edited-2-api", "rel-2-api").await,
        "an edit inside the new target not applied"
    );
}

#[tokio::test]
async fn link_swaps_are_applied_by_the_poll_alone() {
    three_swaps_each_way(false, POLL_MS).await;
}

/// One kubelet update of a ConfigMap volume: `..<ts>/` written, `..data_tmp`
/// pointing at it renamed over `..data`, the old `..<ts>` removed; top-level
/// files are links `x.yaml -> ..data/x.yaml`.
fn kubelet_update(mount: &Path, ts: u32, files: &[(&str, String)]) {
    let data = mount.join(format!("..{ts}"));
    std::fs::create_dir(&data).unwrap();
    for (name, yaml) in files {
        std::fs::write(data.join(name), yaml).unwrap();
    }
    std::os::unix::fs::symlink(format!("..{ts}"), mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    for (name, _) in files {
        let link = mount.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    if ts > 1 {
        std::fs::remove_dir_all(mount.join(format!("..{}", ts - 1))).unwrap();
    }
}

#[tokio::test]
async fn kubelet_configmap_updates_are_applied_in_the_running_service() {
    for (watch, poll_ms) in [(true, 0), (false, POLL_MS)] {
        let issuer = Issuer::start().await;
        let kc = FakeKeycloak::start().await;
        kc.token_ok(60, "artifacts:read", 1..).await;
        let mount = tempfile::tempdir().unwrap();
        kubelet_update(mount.path(), 1, &[("a.yaml", policy_for("cm-1-api"))]);
        let mut opts = Options::new(&kc.uri());
        opts.policies_dir = Some(mount.path().to_path_buf());
        opts.top_extra = reload_table(watch, poll_ms, SETTLE_MS);
        let app = TestApp::start(&issuer, opts).await;
        let token = issuer.mint(&issuer.step());
        assert_eq!(status(&app, &token, "cm-1-api").await, 200);
        for ts in 2..=4 {
            kubelet_update(
                mount.path(),
                ts,
                &[("a.yaml", policy_for(&format!("cm-{ts}-api")))],
            );
            assert!(
                applied(
                    &app,
                    &token,
                    &format!("cm-{ts}-api"),
                    &format!("cm-{}-api", ts - 1)
                )
                .await,
                "ConfigMap update {ts} not applied (watch {watch}, poll_ms {poll_ms})"
            );
        }
    }
}

/// The allow of `main`, with `branchName: main` as its last line: truncated
/// before that line it would admit every branch of the repository.
fn main_only(generation: u32) -> String {
    format!(
        "description: generation {generation}\neffect: allow\ngrant:\n  client: sts-artifacts\n  audience: artifact-api\n  scopes: [artifacts:read]\n  default_scopes: [artifacts:read]\n  max_lifetime_seconds: 300\nwhen:\n{}  branchName: main\n",
        when_repo()
    )
}

/// A policy rewritten in place (truncate, then chunks) while exchanges run: no
/// request is decided by the partial file; the set is applied once it settles.
#[tokio::test]
async fn a_policy_rewritten_in_chunks_is_never_applied_half_written() {
    const SETTLE: u64 = 120;
    const PAUSE: Duration = Duration::from_millis(40);
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), main_only(0))];
    opts.top_extra = reload_table(true, POLL_MS, SETTLE);
    let app = TestApp::start(&issuer, opts).await;
    let path = app.dir.path().join("policies/a.yaml");
    let main = issuer.mint(&issuer.step());
    let mut feature = issuer.step();
    feature.branch_name = Some("feature/x".into());
    let feature = issuer.mint(&feature);
    assert_eq!(status(&app, &main, "artifact-api").await, 200);
    assert_eq!(status(&app, &feature, "artifact-api").await, 400);
    let before = set_digest(&app.address).await;

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            for generation in 1..=30 {
                let text = main_only(generation);
                let cut = text.rfind("  branchName").unwrap();
                let mut f = std::fs::File::create(&path).unwrap(); // truncates
                f.write_all(&text.as_bytes()[..cut]).unwrap();
                std::thread::sleep(PAUSE);
                f.write_all(&text.as_bytes()[cut..]).unwrap();
                drop(f);
                std::thread::sleep(Duration::from_millis(5));
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut decided = 0;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        let s = status(&app, &feature, "artifact-api").await;
        assert_ne!(
            s, 200,
            "a feature/x token got a token from the half-written allow"
        );
        decided += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.join().unwrap();
    assert!(decided > 20, "exchanges ran during the writes ({decided})");
    let s = scrape(&app.address).await;
    assert!(
        value(&s, "sts_policy_reloads_total", &[("result", "unsettled")]) >= 1.0,
        "the unsettled reads were counted"
    );
    // Once the writer is done, the final content is applied.
    assert_ne!(
        digest_after(&app.address, &before).await,
        before,
        "the settled file was applied"
    );
    assert_eq!(status(&app, &feature, "artifact-api").await, 400);
    assert_eq!(status(&app, &main, "artifact-api").await, 200);
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Builds the application on another thread; `None` when it did not return
/// within 10 s (it blocked).
fn build_within_deadline(
    settings: keycloak_ci_sts::configuration::Settings,
) -> Option<Result<(), String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // As in `serve`: the application is built inside a runtime (it listens
        // for SIGHUP from the start).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            keycloak_ci_sts::startup::Application::build(settings)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(10)).ok()
}

/// A FIFO named like a policy or an inventory file never blocks startup or a
/// reload: it is refused as not a regular file.
#[tokio::test]
async fn a_fifo_named_like_a_policy_neither_blocks_startup_nor_a_reload() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1..).await;
    for fifo in ["x.yaml", "inventory/acme.yaml"] {
        let mut opts = Options::new(&kc.uri());
        opts.policies = vec![("a.yaml".into(), policy_for("artifact-api"))];
        let (dir, toml, _) = TestApp::write_config(&issuer, opts);
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(policies.join("inventory")).unwrap();
        mkfifo(&policies.join(fifo));
        let settings =
            keycloak_ci_sts::configuration::Settings::from_toml_str(&toml, dir.path()).unwrap();
        match build_within_deadline(settings) {
            None => panic!("startup blocked on the FIFO {fifo}"),
            Some(Ok(())) => panic!("startup accepted the FIFO {fifo}"),
            Some(Err(e)) => assert!(
                e.contains(fifo) && e.contains("not a regular"),
                "the refusal names the FIFO: {e}"
            ),
        }
    }

    // In the running service: the reload is refused, the old set stays.
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), policy_for("artifact-api"))];
    opts.top_extra = reload_table(true, POLL_MS, SETTLE_MS);
    let app = TestApp::start(&issuer, opts).await;
    let token = issuer.mint(&issuer.step());
    mkfifo(&app.dir.path().join("policies/x.yaml"));
    assert!(
        crate::ops::eventually_reload_refused(&app.address).await,
        "the reload with a FIFO was not refused"
    );
    assert_eq!(status(&app, &token, "artifact-api").await, 200);
    // The service still reloads afterwards.
    std::fs::remove_file(app.dir.path().join("policies/x.yaml")).unwrap();
    std::fs::write(app.dir.path().join("policies/b.yaml"), policy_for("b-api")).unwrap();
    assert!(applied(&app, &token, "b-api", "nothing-api").await);
}

/// The digest of the applied set is logged at startup and at every reload, and
/// is the one the info metric shows.
#[tokio::test]
async fn the_applied_digest_is_logged_and_exposed() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), policy_for("artifact-api"))];
    opts.top_extra = reload_table(false, 0, SETTLE_MS);
    let (dir, _toml, _audit) = TestApp::write_config(&issuer, opts);
    let mut svc = ServiceProcess::start(&dir.path().join("sts.toml"), "info");
    let address = format!("http://127.0.0.1:{}", svc.port);
    let first = set_digest(&address).await;
    std::fs::write(dir.path().join("policies/b.yaml"), policy_for("b-api")).unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &svc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let second = digest_after(&address, &first).await;
    assert_ne!(second, first, "the reload changed the digest metric");
    // The process is killed to stop it: wait until its reload line was read.
    assert!(
        svc.wait_for_line(APPLIED_WITHIN, |l| l.contains(&second)),
        "no log line names the new digest"
    );
    let logs = svc.stop_and_collect_logs();
    let digests: Vec<String> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["digest"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        digests,
        [first, second],
        "startup and reload log their digest"
    );
}

/// An invalid set is refused (logged and counted) once, not again at every
/// watch event or poll tick while its files stay the same (the newcomer review
/// saw one atomic write counted twice; the poll would count it every tick).
#[tokio::test]
async fn an_invalid_set_is_refused_once_until_its_files_change() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), policy_for("one-api"))];
    opts.top_extra = reload_table(true, POLL_MS, SETTLE_MS);
    let app = TestApp::start(&issuer, opts).await;
    let dir = app.dir.path().join("policies");
    let errors = async || {
        value(
            &scrape(&app.address).await,
            "sts_policy_reloads_total",
            &[("result", "error")],
        )
    };
    std::fs::write(
        dir.join("b.tmp"),
        "effect: allow\nwhen: [not, a, mapping]\n",
    )
    .unwrap();
    std::fs::rename(dir.join("b.tmp"), dir.join("b.yaml")).unwrap();
    let deadline = Instant::now() + APPLIED_WITHIN;
    while errors().await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(errors().await, 1.0, "the invalid set was refused");
    // The same invalid bytes written again (a watch event for the same set),
    // and poll ticks. What must not happen is a second refusal, so the test
    // gives the reload loop a window of 25 settle intervals to (not) do it.
    std::fs::write(
        dir.join("b.tmp"),
        "effect: allow\nwhen: [not, a, mapping]\n",
    )
    .unwrap();
    std::fs::rename(dir.join("b.tmp"), dir.join("b.yaml")).unwrap();
    tokio::time::sleep(Duration::from_millis(25 * SETTLE_MS)).await;
    // Then the fix: applied, and the invalid set was counted once.
    std::fs::write(dir.join("b.tmp"), policy_for("two-api")).unwrap();
    std::fs::rename(dir.join("b.tmp"), dir.join("b.yaml")).unwrap();
    let token = issuer.mint(&issuer.step());
    assert!(applied(&app, &token, "two-api", "nothing-api").await);
    assert_eq!(
        errors().await,
        1.0,
        "the same invalid set was refused again"
    );
}
