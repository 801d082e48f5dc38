//! The command line, run as a user would run it.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::*;

/// Runs `cmd` and asserts that it succeeded, showing its standard error
/// otherwise.
fn succeeded(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
}

/// Runs the binary with `args` then `path`; returns (exit code, stdout, stderr).
fn run(args: &[&str], path: &std::path::Path) -> (Option<i32>, String, String) {
    let out = bin().args(args).arg(path).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn policy_check_accepts_the_shipped_policies() {
    let out = succeeded(
        bin()
            .args(["policy", "check", "--dir"])
            .arg(repo_policies_dir()),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 6 policies"));
}

#[test]
fn policy_check_reports_every_bad_file_with_field_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("typo.yaml"),
        "effect: allow\nwhen:\n  repo: x\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("glob.yaml"),
        allow_policy(
            &format!("{}  branchName: \"[\"\n", when_repo()),
            "c",
            "a",
            "s",
            "s",
            60,
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("scope.yaml"),
        allow_policy(&when_repo(), "c", "a", "a", "b", 60),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "check", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("typo.yaml") && err.contains("unknown field `repo`"),
        "{err}"
    );
    assert!(
        err.contains("glob.yaml") && err.contains("when.branchName[0]"),
        "{err}"
    );
    assert!(
        err.contains("scope.yaml") && err.contains("grant.default_scopes[0]"),
        "{err}"
    );
    assert!(err.contains("3 problem(s)"), "{err}");
}

#[test]
fn policy_explain_prints_the_trace_for_a_claims_file() {
    let dir = tempfile::tempdir().unwrap();
    let claims = dir.path().join("claims.json");
    std::fs::write(
        &claims,
        serde_json::json!({
            "sub": format!("{{{REPO}}}:{{{STAGING_ENV}}}"),
            "iss": "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",
            "aud": format!("ari:cloud:bitbucket::workspace/{WS}"),
            "workspaceUuid": format!("{{{WS}}}"),
            "repositoryUuid": format!("{{{REPO}}}"),
            "pipelineUuid": format!("{{{OTHER_REPO}}}"),
            "stepUuid": format!("{{{STAGING_ENV}}}"),
            "branchName": "feature/login",
            "iat": 1_700_000_000u64, "exp": 1_700_003_600u64,
        })
        .to_string(),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "explain", "--dir"])
        .arg(repo_policies_dir())
        .arg("--claims")
        .arg(&claims)
        .args(["--audience", "artifact-api", "--scope", "artifacts:write"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "denied => exit 1");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("policy.branch_not_allowed"), "{s}");
    assert!(
        s.contains("feature/login") && s.contains("release/**"),
        "the operator trace shows patterns: {s}"
    );
    // The decision index leaves out the policies of other audiences, and says
    // how many.
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    let traced: Vec<&str> = v["trace"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["policy"].as_str())
        .collect();
    assert!(!traced.contains(&"deploy-production"), "{s}");
    assert!(v["excluded_by_index"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(v["trace_omitted"], 0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT verified"));
}

#[test]
fn keys_generate_writes_a_private_key_with_mode_0600_and_prints_public_jwk() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("k.pem");
    let out = bin()
        .args(["keys", "generate", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"kty\": \"EC\"") && !stdout.contains("\"d\""),
        "{stdout}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Refuses to overwrite.
    let again = bin()
        .args(["keys", "generate", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

#[test]
fn serve_refuses_bad_configuration_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sts.toml");
    std::fs::write(
        &cfg,
        "[[workspaces]]\nslug = \"acme\"\nuuid = \"not-a-uuid\"\n[keycloak]\nbase_url = \"http://127.0.0.1:1\"\nrealm = \"ci\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sts.toml")
            && err.contains("workspaces[0].uuid")
            && err.contains("not a UUID"),
        "{err}"
    );
}

#[test]
fn policy_explain_takes_only_the_claims_policies_use_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let claims = dir.path().join("claims.json");
    std::fs::write(
        &claims,
        serde_json::json!({
            "workspaceUuid": WS,
            "repositoryUuid": format!("{{{REPO}}}"),
            "branchName": "release/2026/q4",
        })
        .to_string(),
    )
    .unwrap();
    let out = succeeded(
        bin()
            .args(["policy", "explain", "--dir"])
            .arg(repo_policies_dir())
            .arg("--claims")
            .arg(&claims)
            .args(["--audience", "artifact-api"]),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["outcome"]["decision"], "allow");
    assert_eq!(v["outcome"]["client"], "sts-artifacts");
    assert_eq!(
        v["outcome"]["scopes"],
        serde_json::json!(["artifacts:read"])
    );
}

#[test]
fn policy_check_with_config_needs_no_secrets_or_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sts.toml");
    std::fs::write(
        &cfg,
        format!(
            "policies_dir = \"{}\"\npublic_url = \"https://sts.example.test\"\n[[workspaces]]\nslug = \"acme\"\nuuid = \"{WS}\"\naudiences = [\"https://sts.example.test\"]\n[keycloak]\nbase_url = \"https://sso.example.test\"\nrealm = \"ci\"\n[keycloak.clients.sts-deploy]\nmethod = \"private_key_jwt\"\n[keycloak.clients.sts-artifacts]\nmethod = \"client_secret_basic\"\nsecret_env = \"KCS_TEST_SECRET_THAT_IS_NOT_SET\"\n[keycloak.clients.sts-repo]\nmethod = \"private_key_jwt\"\ngrant = \"jwt_authorization_grant\"\n[identity]\nkey_files = [\"/nonexistent/identity.pem\"]\n[signing]\nkey_files = [\"/nonexistent/key.pem\"]\n",
            repo_policies_dir().display()
        ),
    )
    .unwrap();
    succeeded(
        bin()
            .args(["policy", "check", "--dir"])
            .arg(repo_policies_dir())
            .arg("--config")
            .arg(&cfg),
    );
    // A grant naming a client the configuration lacks is caught.
    let pol = tempfile::tempdir().unwrap();
    std::fs::write(
        pol.path().join("p.yaml"),
        allow_policy(&when_repo(), "sts-unknown", "a", "s", "s", 60),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "check", "--dir"])
        .arg(pol.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("grant.client"));
    // A scope the realm model beside the policies does not declare is caught
    // here too, not first by `keycloak apply`.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&repo_policies_dir(), copy.path());
    std::fs::write(
        copy.path().join("undeclared.yaml"),
        allow_policy(
            &when_repo(),
            "sts-artifacts",
            "artifact-api",
            "artifacts:delete",
            "artifacts:delete",
            60,
        ),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "check", "--dir"])
        .arg(copy.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("artifacts:delete") && err.contains("realm.yaml"),
        "{err}"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Issue #7 §1: the policy that read as narrow but admitted every repository.
#[test]
fn policy_check_refuses_empty_conditions_naming_each_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("looks-narrow.yaml"),
        format!(
            "effect: allow\nwhen:\n  workspaceUuid: \"{{{WS}}}\"\n  repositoryUuid:\n  deploymentEnvironmentUuid:\n    # - \"{{{PROD_ENV}}}\"\n  branchName: ~\ngrant: {{client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 300}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("deny-nothing.yaml"),
        format!("effect: deny\nwhen: {{repositoryUuid: \"{{{SANDBOX_REPO}}}\"}}\naudiences: []\n"),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "check", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "when.repositoryUuid",
        "when.deploymentEnvironmentUuid",
        "when.branchName",
    ] {
        assert!(err.contains(field), "{field} not named: {err}");
    }
    assert!(
        err.contains("deny-nothing.yaml") && err.contains("`audiences`"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
}

/// Issue #7 §1: a deny naming an audience no allow grants is a warning.
#[test]
fn policy_check_warns_about_a_deny_for_an_audience_nobody_grants() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("allow.yaml"),
        allow_policy(&when_repo(), "c", "deploy-api", "s", "s", 60),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("deny.yaml"),
        format!("effect: deny\nwhen: {{repositoryUuid: \"{{{SANDBOX_REPO}}}\"}}\naudiences: [deploy-apii]\n"),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "check", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: deny") && err.contains("deploy-apii"),
        "{err}"
    );
}

/// Issue #7 §2: `config check` runs every startup check offline and prints each
/// problem, not only the first.
#[test]
fn config_check_prints_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sts.toml");
    std::fs::write(
        &cfg,
        format!(
            "clock_leeway_seconds = 900\n[[workspaces]]\nslug = \"acme\"\nuuid = \"{{{WS}}}\"\nissuer = \"https://api.bitbucket.org/2.0/workspaces/{{{WS}}}/pipelines-config/identity/oidc\"\naudiences = [\"{STS_AUDIENCE}\"]\n[keycloak]\nbase_url = \"http://keycloak.example.test\"\nrealm = \"ci\"\n[keycloak.clients.c]\nmethod = \"client_secret_basic\"\nsecret_env = \"KCS_TEST_SURELY_UNSET_VARIABLE\"\n"
        ),
    )
    .unwrap();
    let out = bin()
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "`clock_leeway_seconds`",
        "`workspaces[0].issuer`",
        "`keycloak.base_url`",
        "`keycloak.clients.c`",
    ] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }
    assert!(
        err.contains("where Bitbucket puts the workspace slug"),
        "{err}"
    );
    assert!(err.contains("4 problem(s)"), "{err}");
    // Without secrets, the unset variable is not a problem.
    let out = bin()
        .args(["config", "check", "--no-secrets", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problem(s)"), "{err}");
}

#[test]
fn config_check_accepts_the_demo_configuration_and_its_policies() {
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/sts.toml");
    let out = succeeded(
        bin()
            .env("KCS_DEMO_STS_ARTIFACTS_SECRET", "x")
            .args(["config", "check", "--no-secrets", "--config"])
            .arg(&cfg),
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
}

/// The policies a configuration points at are compiled by `config check` too.
#[test]
fn config_check_reports_policy_errors_of_the_configured_directory() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(
        pol.join("p.yaml"),
        allow_policy(&when_repo(), "not-configured", "a", "s", "s", 60),
    )
    .unwrap();
    let cfg = dir.path().join("sts.toml");
    std::fs::write(
        &cfg,
        format!("[[workspaces]]\nslug = \"acme\"\nuuid = \"{{{WS}}}\"\naudiences = [\"{STS_AUDIENCE}\"]\n[keycloak]\nbase_url = \"https://keycloak.example.test\"\nrealm = \"ci\"\n[keycloak.clients.c]\nmethod = \"private_key_jwt\"\n[signing]\nkey_files = [\"not-read-without-secrets.pem\"]\n"),
    )
    .unwrap();
    let out = bin()
        .args(["config", "check", "--no-secrets", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml") && err.contains("grant.client"),
        "{err}"
    );
}

/// Outsider round: a symbolic link in the policies directory must not read a
/// file from elsewhere (a secret would be quoted in the error), a dangling link
/// or a `.YAML` must not drop a policy silently, and other files are warned about.
#[test]
fn policy_files_are_read_only_from_the_directory_and_none_is_dropped_silently() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("art.secret");
    std::fs::write(&secret, "artsecret-XYZ123\n").unwrap();
    let run = |dir: &std::path::Path| run(&["policy", "check", "--dir"], dir);
    let good = allow_policy(&when_repo(), "c", "a", "s", "s", 60);
    type Setup<'a> = Box<dyn Fn(&std::path::Path) + 'a>;
    let cases: Vec<(&str, Setup, &str)> = vec![
        (
            "outside",
            Box::new(|d: &std::path::Path| {
                std::os::unix::fs::symlink(&secret, d.join("leak.yaml")).unwrap()
            }),
            "outside the policies directory",
        ),
        (
            "dangling",
            Box::new(|d: &std::path::Path| {
                std::os::unix::fs::symlink(d.join("gone.yaml"), d.join("deny-sandbox.yaml"))
                    .unwrap()
            }),
            "dangling",
        ),
        (
            "upper case",
            Box::new(|d: &std::path::Path| {
                std::fs::write(d.join("deny.YAML"), "effect: deny\nwhen: {branchName: x}\n")
                    .unwrap()
            }),
            "lower-case",
        ),
        (
            "a directory",
            Box::new(|d: &std::path::Path| std::fs::create_dir(d.join("dir.yaml")).unwrap()),
            "not a regular file",
        ),
    ];
    for (name, setup, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok.yaml"), &good).unwrap();
        setup(dir.path());
        let (code, _, err) = run(dir.path());
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(
            !err.contains("artsecret"),
            "{name}: a secret was printed: {err}"
        );
    }
    // A policy file that is not a policy: its values are never quoted.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.yaml"), "artsecret-XYZ123\n").unwrap();
    std::fs::write(dir.path().join("y.yaml"), "effect: artsecret-XYZ123\n").unwrap();
    let (code, _, err) = run(dir.path());
    assert_eq!(code, Some(1));
    assert!(!err.contains("artsecret"), "a value was quoted: {err}");
    // A Kubernetes ConfigMap mount: links into `..data` inside the directory are
    // followed; other files are warned about, not read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("..data")).unwrap();
    std::fs::write(dir.path().join("..data/p.yaml"), &good).unwrap();
    std::os::unix::fs::symlink(dir.path().join("..data/p.yaml"), dir.path().join("p.yaml"))
        .unwrap();
    std::fs::write(dir.path().join("README.md"), "notes").unwrap();
    let (code, out, err) = run(dir.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok: 1 policies"), "{out}");
    assert!(err.contains("README.md: not a policy file"), "{err}");
}

/// `--no-secrets` skips reading secrets, not the checks that need none.
#[test]
fn config_check_without_secrets_still_requires_signing_for_private_key_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sts.toml");
    std::fs::write(
        &cfg,
        format!("[[workspaces]]\nslug = \"acme\"\nuuid = \"{{{WS}}}\"\naudiences = [\"{STS_AUDIENCE}\"]\n[keycloak]\nbase_url = \"https://keycloak.example.test\"\nrealm = \"ci\"\n[keycloak.clients.c]\nmethod = \"private_key_jwt\"\n"),
    )
    .unwrap();
    let out = bin()
        .args(["config", "check", "--no-secrets", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`signing`"));
}

#[test]
fn policies_admitting_one_identity_with_different_groups_are_refused() {
    // A copy of the shipped policies plus one that admits acme/deploy-service on
    // any branch with release-readers, while release-deploy-service (main only)
    // names release-publishers: the user would be in both groups.
    let (dir, policies) = policies_without_identities();
    for f in ["release-web.yaml", "release-deploy-service.yaml"] {
        std::fs::copy(repo_policies_dir().join(f), policies.join(f)).unwrap();
    }
    std::fs::write(
        policies.join("any-branch.yaml"),
        "effect: allow\nwhen:\n  workspace: acme\n  repository: acme/deploy-service\ngrant:\n  client: sts-repo\n  audience: release-api\n  scopes: [release:read, release:publish]\n  default_scopes: [release:read]\n  max_lifetime_seconds: 60\n  groups: [release-readers]\n",
    )
    .unwrap();
    let cfg = dir.path().join("sts.toml");
    std::fs::write(
        &cfg,
        format!(
            "policies_dir = \"{}\"\npublic_url = \"https://sts.example.test\"\n[[workspaces]]\nslug = \"acme\"\nuuid = \"{WS}\"\naudiences = [\"https://sts.example.test\"]\n[keycloak]\nbase_url = \"https://sso.example.test\"\nrealm = \"ci\"\n[keycloak.clients.sts-deploy]\nmethod = \"private_key_jwt\"\n[keycloak.clients.sts-artifacts]\nmethod = \"client_secret_basic\"\nsecret_env = \"KCS_TEST_SECRET_THAT_IS_NOT_SET\"\n[keycloak.clients.sts-repo]\nmethod = \"private_key_jwt\"\ngrant = \"jwt_authorization_grant\"\n[identity]\nkey_files = [\"/nonexistent/identity.pem\"]\n[signing]\nkey_files = [\"/nonexistent/key.pem\"]\n",
            policies.display()
        ),
    )
    .unwrap();
    let out = bin()
        .args(["policy", "check", "--dir"])
        .arg(&policies)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "admits acme/deploy-service's identity like policy `any-branch` but names other groups"
        ),
        "{err}"
    );
}

/// Issue 19 §2c: the configuration file is read without blocking (a FIFO with
/// no writer is refused at once) and bounded (a larger file is refused unread).
#[test]
fn config_check_never_blocks_on_a_fifo_or_reads_a_huge_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, "# x\n".repeat(300_000)).unwrap();
    for (file, says) in [(&fifo, "not a regular file"), (&huge, "larger than")] {
        let mut child = bin()
            .args(["config", "check", "--config"])
            .arg(file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("config check blocked on {}", file.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{}: {err}", file.display());
    }
}
