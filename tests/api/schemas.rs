//! The JSON Schemas of the files people write, committed under
//! `docs/src/schemas/`: each must be what the types generate today
//! (`KCS_UPDATE_SCHEMAS=1 cargo test --test api schemas` rewrites them).
//! scripts/schemas.sh validates the shipped examples and the rejected cases
//! against them.

use std::path::PathBuf;

fn committed(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("docs/src/schemas/{name}.schema.json"))
}

fn check(name: &str, generated: serde_json::Value) {
    let text = serde_json::to_string_pretty(&generated).unwrap() + "\n";
    let path = committed(name);
    if std::env::var_os("KCS_UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == text,
        "{} differs from the schema the types generate: run KCS_UPDATE_SCHEMAS=1 cargo test --test api schemas",
        path.display()
    );
}

#[test]
fn the_policy_schema_is_the_generated_one() {
    check("policy", keycloak_ci_sts::policy::schema());
}

#[test]
fn the_realm_model_schema_is_the_generated_one() {
    check(
        "realm-model",
        keycloak_ci_sts::provision::model::RealmModel::schema(),
    );
}

#[test]
fn the_realm_model_reader_agrees_with_the_schema_cases() {
    cases("realm-model", |_, text| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keycloak")).unwrap();
        std::fs::write(dir.path().join("keycloak/realm.yaml"), text).unwrap();
        keycloak_ci_sts::provision::model::RealmModel::load(dir.path())
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    });
}

#[test]
fn the_configuration_schema_is_the_generated_one() {
    check("configuration", keycloak_ci_sts::configuration::schema());
}

/// `config check --no-secrets` (every startup check without reading secrets)
/// on each configuration case.
#[test]
fn config_check_agrees_with_the_schema_cases() {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema/configuration");
    cases("configuration", |id, _| {
        let dir = if root.join("accepted").join(format!("{id}.toml")).exists() {
            "accepted"
        } else {
            "rejected"
        };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
            .args(["config", "check", "--no-secrets", "--config"])
            .arg(root.join(dir).join(format!("{id}.toml")))
            .env_clear()
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr))
        }
    });
}

#[test]
fn the_inventory_schema_is_the_generated_one() {
    check("inventory", keycloak_ci_sts::inventory::schema());
}

/// Each case of `tests/fixtures/schema/<kind>/{accepted,rejected}` against `read`.
fn cases(kind: &str, read: impl Fn(&str, &str) -> Result<(), String>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/schema")
        .join(kind);
    for (dir, want_ok) in [("accepted", true), ("rejected", false)] {
        let mut n = 0;
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let id = path.file_stem().unwrap().to_str().unwrap();
            let got = read(id, &text);
            assert_eq!(got.is_ok(), want_ok, "{}: {:?}", path.display(), got.err());
            n += 1;
        }
        assert!(n >= 1, "{kind}/{dir}: no cases");
    }
}

#[test]
fn the_inventory_reader_agrees_with_the_schema_cases() {
    cases("inventory", |_, text| {
        keycloak_ci_sts::inventory::read_text(text).map(|_| ())
    });
}

/// The policy cases under tests/fixtures/schema/policy: the loader accepts
/// each of `accepted/` and refuses each of `rejected/` (one broken rule each,
/// a rule the schema states too: scripts/schemas.sh checks the schema's side).
#[test]
fn the_policy_loader_agrees_with_the_schema_cases() {
    cases("policy", |id, text| {
        keycloak_ci_sts::policy::compile_str(id, text, None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
}
