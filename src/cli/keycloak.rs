//! `keycloak plan|apply|export`: the realm the policies need. Exit codes: 0 in
//! sync (plan) or done (apply, export); 1 the realm refused or has a conflicting
//! object (nothing changed by apply), or an Admin API call failed; 2 usage,
//! configuration or model error; 3 (plan only) changes pending, like
//! `terraform plan -detailed-exitcode` (whose 2 our CLI already uses).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use secrecy::SecretString;

use super::out;
use crate::configuration::{Secrets, Settings};
use crate::keycloak::ClientAuth;
use crate::policy::PolicySet;
use crate::provision::admin::{Admin, Credentials};
use crate::provision::apply::DEFAULT_MAX_REMOVALS;
use crate::provision::desired::{derive, Auth, Desired, Inputs};
use crate::provision::identities::IdentityInputs;
use crate::provision::model::RealmModel;
use crate::provision::{self, export};

/// Exit code of `keycloak plan` when changes are pending.
pub const EXIT_CHANGES_PENDING: u8 = 3;

/// The admin client's credentials on the command line.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// `clientId` of the admin client (a confidential client with service accounts
    /// and realm-management roles; docs/src/keycloak.md).
    #[arg(long, env = "KCS_ADMIN_CLIENT_ID")]
    pub admin_client_id: String,
    /// File holding the admin client's secret.
    #[arg(long)]
    pub admin_secret_file: Option<PathBuf>,
    /// Environment variable holding the admin client's secret (when no file is given).
    #[arg(long, default_value = "KCS_ADMIN_CLIENT_SECRET")]
    pub admin_secret_env: String,
    /// Realm the admin client lives in. Defaults to the configured realm.
    #[arg(long)]
    pub admin_realm: Option<String>,
    /// Independent Admin API calls in flight at once (reads of users' links,
    /// groups' members, roles' holders; batches of new users). Keycloak's busy
    /// answers (429, 503) are retried with backoff whatever the value.
    #[arg(long, default_value_t = crate::provision::admin::DEFAULT_CONCURRENCY as u16,
          value_parser = clap::value_parser!(u16).range(1..=crate::provision::admin::MAX_CONCURRENCY as i64))]
    pub concurrency: u16,
}

/// Reads the configuration (client secrets only with `secrets`), the policies and
/// the realm model, and derives the desired state. Prints warnings.
fn desired(config: &Path, secrets: Secrets) -> anyhow::Result<(Settings, Desired)> {
    let (settings, report) = Settings::check(config, secrets);
    let Some(settings) = settings else {
        let lines: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("{}", lines.join("\n"));
    };
    let desired = derive_for(&settings, secrets)?;
    for w in &desired.warnings {
        eprintln!("warning: {w}");
    }
    Ok((settings, desired))
}

/// The desired realm of validated `settings` (policies and realm model read from
/// its `policies_dir`); `config check` calls it too when the model file exists.
///
/// # Errors
/// Every policy, model or consistency problem, one line each.
pub(super) fn derive_for(settings: &Settings, secrets: Secrets) -> anyhow::Result<Desired> {
    let known = settings.keycloak.clients.keys().cloned().collect();
    let set = PolicySet::load_dir(&settings.policies_dir, Some(&known)).map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let model = RealmModel::load(&settings.policies_dir).map_err(|e| {
        anyhow::anyhow!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let clients = settings
        .keycloak
        .clients
        .iter()
        .map(|(id, auth)| {
            let a = match (auth, secrets) {
                (ClientAuth::PrivateKeyJwt, _) => Auth::PrivateKeyJwt,
                (ClientAuth::ClientSecretBasic(s), Secrets::Read | Secrets::ClientSecrets) => {
                    Auth::ClientSecret(Some(s.clone()))
                }
                (ClientAuth::ClientSecretBasic(_), Secrets::Skip) => Auth::ClientSecret(None),
            };
            (id.clone(), a)
        })
        .collect();
    let alg = format!("{:?}", settings.signing_algorithm);
    let identity = settings.keycloak.identity.as_ref().map(|i| IdentityInputs {
        issuer: i.issuer.clone(),
        alias: i.provider_alias.clone(),
        algorithm: i.algorithm.name().to_string(),
        realm: settings.keycloak.realm.clone(),
    });
    let inputs = Inputs {
        public_url: settings.public_url.as_ref(),
        signing_alg: &alg,
        clients,
        jwt_clients: settings.keycloak.jwt_clients(),
        identity,
    };
    derive(inputs, set.policies(), set.inventory(), &model).map_err(|e| {
        anyhow::anyhow!(
            "the policies and keycloak/realm.yaml disagree:\n{}",
            e.join("\n")
        )
    })
}

fn admin(settings: &Settings, a: AdminArgs) -> anyhow::Result<Admin> {
    let secret = match &a.admin_secret_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read --admin-secret-file {}: {e}", f.display()))?,
        None => std::env::var(&a.admin_secret_env).map_err(|_| {
            anyhow::anyhow!(
                "environment variable `{}` is not set (or use --admin-secret-file)",
                a.admin_secret_env
            )
        })?,
    };
    let secret = secret.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        anyhow::bail!("the admin client's secret is empty");
    }
    let kc = &settings.keycloak;
    let http = crate::http::client(kc.connect_timeout, kc.timeout)?;
    let creds = Credentials {
        realm: a.admin_realm.unwrap_or_else(|| kc.realm.clone()),
        client_id: a.admin_client_id,
        secret: SecretString::from(secret),
    };
    Ok(Admin::new(&kc.base_url, &kc.realm, creds, http)
        .with_concurrency(usize::from(a.concurrency)))
}

/// The admin client is never one of the objects the desired state names.
fn refuse_admin_client(desired: &Desired, admin: &Admin) -> anyhow::Result<()> {
    let id = admin.client_id();
    let named = desired.clients.iter().any(|c| c.client_id == id)
        || desired.resource_servers.iter().any(|r| r.client_id == id);
    if named {
        anyhow::bail!("the admin client `{id}` is named by the configuration or keycloak/realm.yaml: plan and apply never change it");
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `keycloak plan`: prints what `apply` would change. Exit 0 in sync, 3 changes
/// pending, 1 problems (conflicts) or a failed call.
///
/// # Errors
/// Configuration, policy, model or credential errors (exit 2).
pub fn plan(config: &Path, prune: bool, verbose: bool, a: AdminArgs) -> anyhow::Result<ExitCode> {
    let (settings, desired) = desired(config, Secrets::Skip)?;
    let admin = admin(&settings, a)?;
    refuse_admin_client(&desired, &admin)?;
    let read = runtime()?.block_on(provision::plan(&admin, &desired, prune));
    eprintln!("Admin API calls: {}", admin.calls());
    let p = match read {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let removals = p.removals();
    if removals > 0 {
        let over = if removals > DEFAULT_MAX_REMOVALS {
            format!(
                "; more than {}: apply needs --max-removals {removals}",
                DEFAULT_MAX_REMOVALS
            )
        } else {
            String::new()
        };
        out(&format!("{removals} object(s) to remove{over}"))?;
    }
    let lines = match verbose {
        true => p.render(),
        false => p.render_summary(),
    };
    for line in lines {
        out(&line)?;
    }
    let realm = &settings.keycloak.realm;
    if !p.problems.is_empty() {
        eprintln!(
            "{} problem(s): apply would change nothing in realm {realm}",
            p.problems.len()
        );
        Ok(ExitCode::from(1))
    } else if p.pending() {
        out(&format!(
            "changes pending in realm {realm}: run `keycloak apply`"
        ))?;
        Ok(ExitCode::from(EXIT_CHANGES_PENDING))
    } else {
        out(&format!("realm {realm} is in sync with the policies"))?;
        Ok(ExitCode::SUCCESS)
    }
}

/// What `keycloak plan` says of the realm, in one line (for `report access`):
/// `clean: …`, `not clean: …`, or `not checked: <why>`.
pub fn plan_summary(config: &Path, a: AdminArgs) -> String {
    let run = || -> anyhow::Result<String> {
        let (settings, desired) = desired(config, Secrets::Skip)?;
        let admin = admin(&settings, a)?;
        refuse_admin_client(&desired, &admin)?;
        let p = runtime()?
            .block_on(provision::plan(&admin, &desired, false))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let realm = &settings.keycloak.realm;
        Ok(if !p.problems.is_empty() {
            format!(
                "not clean: {} problem(s) in realm {realm} (run keycloak plan)",
                p.problems.len()
            )
        } else if p.pending() {
            format!("not clean: changes pending in realm {realm} (run keycloak plan to see them)")
        } else {
            format!("clean: realm {realm} is in sync with the policies")
        })
    };
    run().unwrap_or_else(|e| format!("not checked: {e:#}"))
}

/// `keycloak apply`: makes the plan's changes and sets client secrets; prints each.
///
/// # Errors
/// Configuration, policy, model or credential errors (exit 2).
pub fn apply(
    config: &Path,
    prune: bool,
    max_removals: usize,
    interrupt_after_calls: Option<u64>,
    a: AdminArgs,
) -> anyhow::Result<ExitCode> {
    let (settings, desired) = desired(config, Secrets::ClientSecrets)?;
    let admin = admin(&settings, a)?.interrupted_after(interrupt_after_calls);
    refuse_admin_client(&desired, &admin)?;
    // Each change is printed as it is made.
    let mut journal = provision::diff::Journal::new(|line| {
        let _ = out(line);
    });
    let result = runtime()?.block_on(provision::apply(
        &admin,
        &desired,
        prune,
        max_removals,
        &mut journal,
    ));
    eprintln!("Admin API calls: {}", admin.calls());
    let realm = &settings.keycloak.realm;
    // `= …` lines report what was found done already (a racing apply), not a change.
    let changes = journal
        .lines()
        .iter()
        .filter(|l| !l.starts_with("= "))
        .count();
    match result {
        Ok(()) if changes == 0 => out(&format!(
            "realm {realm} was already in sync; nothing changed"
        ))?,
        Ok(()) => out(&format!("applied {changes} change(s) to realm {realm}"))?,
        Err(e) => {
            eprintln!("error: {e}");
            if changes > 0 {
                eprintln!(
                    "{changes} change(s) were made before the error (listed above); run apply again"
                );
            }
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keycloak export`: the desired state as realm-import JSON (no secrets), to
/// `out` or standard output. Reads no secret and calls no server.
///
/// # Errors
/// Configuration, policy or model errors, an unwritable file (exit 2).
pub fn export(config: &Path, out_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (settings, desired) = desired(config, Secrets::Skip)?;
    let doc = export::realm_json(&settings.keycloak.realm, &desired);
    let text = serde_json::to_string_pretty(&doc)?;
    match out_file {
        Some(f) => {
            std::fs::write(f, format!("{text}\n"))
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", f.display()))?;
            out(&format!("wrote {}", f.display()))?;
        }
        None => out(&text)?,
    }
    Ok(ExitCode::SUCCESS)
}
