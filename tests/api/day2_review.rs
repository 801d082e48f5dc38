//! Issue 19: what the attack review of the day-2 fixes found still broken,
//! each a regression test (both failed before their fixes).

use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::reload_day2::{policy_for, status};

async fn granted_within(app: &TestApp, token: &str, audience: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if status(app, token, audience).await == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The policies directory itself (not a link) replaced by rename
/// (`mv policies policies.old && mv policies.new policies`): the parent watch
/// sees the rename and the new set is applied, but the recursive watch stays on
/// the old directory's inode unless `DirWatch::follow` compares device and
/// inode, not only the canonical path: later edits in the new directory were
/// never seen by the watch (with `poll_ms = 0`: never applied until SIGHUP).
#[tokio::test]
async fn edits_after_a_directory_swap_by_rename_are_seen_by_the_watch() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), policy_for("one-api")).unwrap();
    let mut opts = Options::new(&kc.uri());
    opts.policies_dir = Some(dir.clone());
    opts.top_extra = "watch_policies = true\n\n[policies]\npoll_ms = 0\nsettle_ms = 20\n".into();
    let app = TestApp::start(&issuer, opts).await;
    let token = issuer.mint(&issuer.step());
    assert_eq!(status(&app, &token, "one-api").await, 200);

    // Deploy a new directory and rename it into place.
    let new = root.path().join("policies.new");
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("a.yaml"), policy_for("two-api")).unwrap();
    std::fs::rename(&dir, root.path().join("policies.old")).unwrap();
    std::fs::rename(&new, &dir).unwrap();
    assert!(
        granted_within(&app, &token, "two-api", Duration::from_secs(5)).await,
        "the swap itself is applied (parent watch)"
    );

    // Now an ordinary atomic edit inside the (new) policies directory.
    std::fs::write(dir.join("b.tmp"), policy_for("three-api")).unwrap();
    std::fs::rename(dir.join("b.tmp"), dir.join("b.yaml")).unwrap();
    assert!(
        granted_within(&app, &token, "three-api", Duration::from_secs(5)).await,
        "an edit after the swap is never applied by the watch (docs/src/operating.md: at most ~2 x settle_ms)"
    );
}

/// The audit file's directory replaced by a regular file (or any `stat(2)`
/// error other than ENOENT: ENOTDIR, ELOOP, EACCES for a non-root service):
/// `PathFile::prepare` kept writing to the open, renamed file; once that file
/// was deleted, tokens were answered 200 with their audit line in a deleted
/// inode. Now the audit is unavailable and tokens are withheld.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_once_the_audit_path_cannot_be_examined() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let logs_root = tempfile::tempdir().unwrap();
    let logs = logs_root.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let audit = logs.join("audit.jsonl");
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
    opts.audit_toml = Some(format!(
        "[audit]\npath = \"{}\"\nreopen_interval_ms = 50",
        audit.display()
    ));
    let (dir, _toml, _audit) = TestApp::write_config(&issuer, opts);
    let svc = ServiceProcess::start(&dir.path().join("sts.toml"), "info");
    let base = format!("http://127.0.0.1:{}", svc.port);
    let http = reqwest::Client::new();
    let status = async || {
        let token = issuer.mint(&issuer.step());
        post_exchange(&http, &format!("{base}/token"), &token, "artifact-api")
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status().await, 200);
    assert_eq!(std::fs::read_to_string(&audit).unwrap().lines().count(), 1);
    // The log directory moves away; a plain file now stands where it was.
    let old = logs_root.path().join("logs.old");
    std::fs::rename(&logs, &old).unwrap();
    std::fs::write(&logs, "not a directory").unwrap();
    std::fs::remove_dir_all(&old).unwrap();
    // No wait: the path is examined before every write.
    let mut issued = 0;
    for _ in 0..5 {
        if status().await == 200 {
            issued += 1;
        }
    }
    assert_eq!(
        issued, 0,
        "{issued} tokens answered 200 while the audit path names no file: their lines went to a deleted inode"
    );
}
