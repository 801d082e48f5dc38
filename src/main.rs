//! `keycloak-ci-sts` binary: see [`keycloak_ci_sts::cli`] for the commands and
//! their exit codes.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// The commit a release was built from: `KCS_GIT_COMMIT` at build time
/// (scripts/lib/dist.sh, the Dockerfile's build argument); `unknown` in a
/// developer's build.
const COMMIT: &str = match option_env!("KCS_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// mimalloc instead of the system allocator: an exchange allocates a few hundred
/// small, short-lived objects (form, claims, JSON, HTTP); measured with
/// `scripts/bench-cpu.sh`, glibc's malloc and free took about a tenth of the
/// service's CPU per exchange.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the `mi_option_e`
/// enum; the Rust bindings name only some options). The test below checks the
/// index against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before returning it to the system, in
/// milliseconds, unless `MIMALLOC_PURGE_DELAY` says otherwise. mimalloc 3's
/// default is 1,000: a policy reload at organisation size frees the old set and
/// its parse (tens of MiB) and, with that default, the service's resident
/// memory peaked at 77 MiB with 20,000 repositories and 5,000 policies against
/// 62 MiB at 10 ms (three reloads of that set, issue #20), mimalloc 2's
/// default. `MIMALLOC_PURGE_DELAY` in the environment takes precedence.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` stores an integer in mimalloc's option table
        // (any value is valid for this option); no memory is touched.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // `--version`: the version and the commit (leaked once, at startup).
    let version: &'static str =
        Box::leak(format!("{} (commit {COMMIT})", env!("CARGO_PKG_VERSION")).into_boxed_str());
    let matches = keycloak_ci_sts::cli::Cli::command()
        .version(version)
        .get_matches();
    let cli = match keycloak_ci_sts::cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match keycloak_ci_sts::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        #[allow(unsafe_code)]
        // SAFETY: reads and writes an integer of mimalloc's option table.
        let (before, after) = unsafe {
            let before = libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY);
            super::tune_allocator();
            (
                before,
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY),
            )
        };
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            // mimalloc 3's default for purge_delay, and no other option's at 15
            Err(_) => {
                assert_eq!(before, 1000, "option 15 is not mimalloc 3's purge_delay");
                assert_eq!(after, super::PURGE_DELAY_MS);
            }
            Ok(v) => assert_eq!(after, v.parse::<std::ffi::c_long>().unwrap_or(before)),
        }
    }
}
