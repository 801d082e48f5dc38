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
    // Into memory first: clap_complete panics on a failed write (a full disk).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name.clone(), &mut script);
    if shell == clap_complete::Shell::Bash {
        script = fix_bash_names(&script, &name);
    }
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing the completion script")
}

/// clap_complete 4.6 names a hyphenated program's subcommand branches
/// `keycloak__subcmd__ci__subcmd__sts__subcmd__…` but looks them up as
/// `keycloak__ci__sts__subcmd__…`, so nothing below the first word completes
/// (clap-rs/clap#6421). Spells the branches as they are looked up.
fn fix_bash_names(script: &[u8], name: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(script);
    let wrong = format!("{}__subcmd__", name.replace('-', "__subcmd__"));
    let right = format!("{}__subcmd__", name.replace('-', "__"));
    text.replace(&wrong, &right).into_bytes()
}

/// Writes one man page per command into `dir`: `keycloak-ci-sts.1`, and
/// `keycloak-ci-sts-<command>[-<subcommand>].1` for each (sub)command.
///
/// # Errors
/// The directory cannot be created or a page cannot be written.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // No `help` subcommands: they have no page of their own, and every parent
    // page would list one it cannot point to.
    let mut cmd = without_help_subcommands(Cli::command());
    cmd.build();
    write_page(&cmd, dir)
}

fn without_help_subcommands(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names
        .iter()
        .fold(cmd.disable_help_subcommand(true), |c, n| {
            c.mut_subcommand(n, without_help_subcommands)
        })
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
    // A new file renamed over the page: an existing symbolic link is replaced,
    // never followed (the page never lands outside `dir`).
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(&buf)
        .with_context(|| format!("writing {}", page.display()))?;
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .with_context(|| format!("writing {}", page.display()))?;
    tmp.persist(&page)
        .with_context(|| format!("writing {}", page.display()))?;
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
        let root = Cli::command().render_long_help().to_string();
        assert!(root.contains("Example:\n  keycloak-ci-sts serve"), "{root}");
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
            assert!(!page.contains("-help(1)"), "{name}.1 points to a help page");
        }
    }

    #[test]
    fn a_symbolic_link_in_place_of_a_page_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "keep").unwrap();
        let pages = dir.path().join("man");
        std::fs::create_dir(&pages).unwrap();
        std::os::unix::fs::symlink(&victim, pages.join("keycloak-ci-sts.1")).unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("new"),
            pages.join("keycloak-ci-sts-serve.1"),
        )
        .unwrap();
        man_pages(&pages).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!dir.path().join("new").exists());
        let page = std::fs::symlink_metadata(pages.join("keycloak-ci-sts.1")).unwrap();
        assert!(page.file_type().is_file());
    }

    #[test]
    fn a_failed_completion_write_is_an_error_not_a_panic() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("no space left on device"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert!(completions(clap_complete::Shell::Bash, &mut Full).is_err());
    }

    /// What bash offers after `words` (the last one being completed), with the
    /// generated script loaded.
    fn bash_completes(words: &[&str]) -> String {
        let mut script = Vec::new();
        completions(clap_complete::Shell::Bash, &mut script).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.bash"), script).unwrap();
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let probe = format!(
            "source c.bash; COMP_WORDS=({}); COMP_CWORD={}; _keycloak__ci__sts keycloak-ci-sts '{}' '{}'; echo \"${{COMPREPLY[*]}}\"",
            quoted.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "-c", &probe])
            .current_dir(dir.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn bash_completes_subcommands_and_their_flags() {
        let sub = bash_completes(&["keycloak-ci-sts", "keycloak", ""]);
        assert!(sub.contains("plan") && sub.contains("apply"), "{sub}");
        let flags = bash_completes(&["keycloak-ci-sts", "keycloak", "plan", "--"]);
        assert!(flags.contains("--config"), "{flags}");
        let inspect = bash_completes(&["keycloak-ci-sts", "token", "inspect", "--"]);
        assert!(inspect.contains("--realm"), "{inspect}");
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
