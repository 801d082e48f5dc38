//! `completions` and `man`: shell completion scripts and man pages generated
//! from the command definitions (clap_complete, clap_mangen), so they list
//! exactly the commands and flags this binary has. The release tarball ships
//! both (scripts/release.sh).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::Cli;

/// Writes the completion script for `shell` to `out`.
///
/// # Errors
/// Writing to `out` failed.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
    out.flush().context("writing the completion script")
}

/// Writes one man page per command into `dir`: `keycloak-ci-sts.1`, and
/// `keycloak-ci-sts-<command>[-<subcommand>].1` for each (sub)command.
///
/// # Errors
/// The directory cannot be created or a page cannot be written.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write_page(&cmd, dir)
}

/// The page of `cmd` (named by its full path, e.g. `keycloak-ci-sts-policy-check`)
/// and those of its subcommands.
fn write_page(cmd: &clap::Command, dir: &Path) -> anyhow::Result<()> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let page = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.clone()))
        .render(&mut buf)
        .with_context(|| format!("rendering {}", page.display()))?;
    std::fs::write(&page, buf).with_context(|| format!("writing {}", page.display()))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() != "help" {
            write_page(sub, dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every visible command and subcommand: its page name, the words that
    /// run it (`keycloak-ci-sts policy check`) and the command.
    fn all(cmd: &clap::Command, path: &str, out: &mut Vec<(String, String, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() != "help" {
                let name = sub.get_display_name().unwrap_or(sub.get_name()).to_string();
                let words = format!("{path} {}", sub.get_name());
                out.push((name, words.clone(), sub.clone()));
                all(sub, &words, out);
            }
        }
    }

    fn commands() -> Vec<(String, String, clap::Command)> {
        let mut cmd = Cli::command();
        cmd.build();
        let mut out = Vec::new();
        all(&cmd, "keycloak-ci-sts", &mut out);
        out
    }

    #[test]
    fn every_command_s_help_shows_an_example_of_itself() {
        let commands = commands();
        assert!(commands.len() >= 20, "{}", commands.len());
        for (name, words, mut cmd) in commands {
            let help = cmd.render_long_help().to_string();
            let example = help
                .split_once("Example:\n  ")
                .map(|(_, e)| e.lines().next().unwrap_or_default().to_string())
                .unwrap_or_else(|| panic!("{name}: no example in --help"));
            // The example runs this command (for a group, one of its own).
            assert!(
                example.starts_with(&format!("{words} ")),
                "{name}: the example runs another command: {example}"
            );
        }
    }

    #[test]
    fn a_man_page_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let root = std::fs::read_to_string(dir.path().join("keycloak-ci-sts.1")).unwrap();
        assert!(root.contains(".TH keycloak-ci-sts 1"), "{root}");
        for (name, ..) in commands() {
            let page = std::fs::read_to_string(dir.path().join(format!("{name}.1")))
                .unwrap_or_else(|e| panic!("{name}.1: {e}"));
            assert!(page.contains("Example:"), "{name}.1 lacks the example");
        }
    }

    #[test]
    fn completions_name_every_command() {
        let mut bash = Vec::new();
        completions(clap_complete::Shell::Bash, &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        for word in [
            "serve",
            "inventory",
            "explain",
            "apply",
            "completions",
            "--no-secrets",
        ] {
            assert!(bash.contains(word), "bash completion lacks {word}");
        }
    }
}
