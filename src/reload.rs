//! Policy reload without restart: on SIGHUP and when a file in the policies
//! directory changes. The new set is compiled first and swapped atomically; an
//! invalid set is refused (logged, counted) and the old one stays active.
//! Requests already running keep the set they started with (they hold an `Arc`).

use std::path::Path;
use std::time::Duration;

use crate::policy::PolicyError;
use crate::state::AppState;

/// Compiles the policies directory and, when valid, swaps it in.
///
/// # Errors
/// Every problem of the new set; the active set is unchanged then.
pub fn reload(state: &AppState) -> Result<usize, Vec<PolicyError>> {
    let before = state.exchange.policies.current();
    match state.exchange.policies.reload() {
        Ok(set) => {
            let n = set.policies().len();
            let kept: std::collections::BTreeSet<&str> =
                set.policies().iter().map(|p| p.id.as_str()).collect();
            for gone in before
                .policies()
                .iter()
                .filter(|p| !kept.contains(p.id.as_str()))
            {
                tracing::warn!(policy = %gone.id, effect = ?gone.effect, "policy removed by this reload");
            }
            for w in set.warnings() {
                tracing::warn!(warning = %w, "policy warning");
            }
            state
                .metrics
                .policy_reloads
                .with_label_values(&["ok"])
                .inc();
            tracing::info!(policies = n, "policies reloaded");
            Ok(n)
        }
        Err(errors) => {
            state
                .metrics
                .policy_reloads
                .with_label_values(&["error"])
                .inc();
            for e in &errors {
                tracing::error!(error = %e, "policy reload refused; the previous policies stay active");
            }
            Err(errors)
        }
    }
}

/// Runs until aborted: reloads on SIGHUP and (when `watch`) on changes in the
/// policies directory or its `inventory/`,
/// debounced by 250 ms; also runs limiter housekeeping every 60 s and probes
/// the upstreams every 10 s (the `sts_upstream_up` gauge).
pub async fn run(state: actix_web::web::Data<AppState>, watch: bool) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let _watcher = if watch {
        watch_dir(state.exchange.policies.dir(), tx.clone())
    } else {
        None
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut probe = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                while rx.try_recv().is_ok() {}
                let _ = reload(&state);
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading policies");
                let _ = reload(&state);
            }
            _ = tick.tick() => state.exchange.limiter.housekeeping(),
            _ = probe.tick() => {
                let s = state.clone();
                tokio::spawn(async move { s.exchange.probe_upstreams().await });
            }
        }
    }
}

fn watch_dir(dir: &Path, tx: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove() {
                    let _ = tx.try_send(());
                }
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the policies directory; SIGHUP still reloads");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the policies directory; SIGHUP still reloads");
        return None;
    }
    Some(watcher)
}
