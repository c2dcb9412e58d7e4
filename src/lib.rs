//! clusterctl: run any network server as a multi-process, zero-downtime service under systemd.
//!
//! The binary is a thin wrapper around [`main`]; nothing else is public (the integration
//! tests run the binary), so rustc reports dead code.
//!
//! Dependencies point one way: `cli` (clap) → `config` (single values); `settings`
//! (validated options, argv, derived timeouts, PATH) → `cli`, `config`; `units` and
//! `supervisor` → `settings`; this file → everything.

pub(crate) mod cli;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod error;
pub(crate) mod idle;
pub(crate) mod journal;
pub(crate) mod log;
pub(crate) mod notify;
pub(crate) mod settings;
pub(crate) mod sockets;
pub(crate) mod supervisor;
mod sys;
pub(crate) mod units;

use clap::Parser;

use std::ffi::OsString;

use crate::cli::{Cli, Command};
use crate::error::exit;

/// Runs clusterctl with these arguments and returns the process exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    // Before anything opens a file: a closed fd 0-2 would be taken by the next socket.
    sys::ensure_std_fds();
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return exit::OK;
            }
            if let Some(hint) = missing_dashdash_hint(&args) {
                eprint_line(&format!("\nhint: {hint}"));
            }
            return exit::USAGE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => {
            match settings::RunSettings::from_args(args).and_then(supervisor::run) {
                Ok(0) => Ok(()),
                Ok(code) => return code,
                Err(e) => Err(e),
            }
        }
        Command::GenUnits(args) => units::gen_units(&args),
        Command::Reload(a) => {
            return ctl(
                &a.target,
                &control::Request::Reload {
                    rolling: false,
                    wait: a.wait,
                },
            );
        }
        Command::Restart(a) => {
            return ctl(
                &a.target,
                &control::Request::Reload {
                    rolling: a.rolling,
                    wait: a.wait,
                },
            );
        }
        Command::Status(a) => return ctl(&a.target, &control::Request::Status { json: a.json }),
        Command::Upgrade(a) => {
            // A relative --binary means the caller's directory, not the supervisor's.
            let binary = a.binary.map(|b| std::path::absolute(&b).unwrap_or(b));
            return ctl(
                &a.target,
                &control::Request::Upgrade {
                    wait: a.wait,
                    binary,
                },
            );
        }
        Command::Logs(a) => logs(&a),
        Command::Man(a) => man(&a),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "clusterctl",
                &mut out,
            );
            write_stdout(&out)
        }
        Command::Scale(a) => match a.split() {
            Ok((target, n)) => return ctl(&target, &control::Request::Scale(n.resolve())),
            Err(e) => return usage_error(&e, "scale"),
        },
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => report(&e),
    }
}

/// For a command line that clap refused: when `run` or `gen-units` got the worker command
/// without `--` in front of it, the corrected line (the last place where inserting `--`
/// makes the line parse).
pub fn missing_dashdash_hint(args: &[OsString]) -> Option<String> {
    let sub = args.iter().position(|a| a == "run" || a == "gen-units")?;
    if args.iter().any(|a| a == "--") {
        return None;
    }
    // From the right: the latest split that parses keeps the most words as options.
    for at in ((sub + 1)..args.len()).rev() {
        let mut fixed: Vec<OsString> = args.to_vec();
        fixed.insert(at, "--".into());
        if Cli::try_parse_from(&fixed).is_ok() {
            let words: Vec<String> = fixed
                .iter()
                .skip(1)
                .map(|w| units::shell_word(&w.to_string_lossy()))
                .collect();
            return Some(format!(
                "the worker command goes after `--`:\n  clusterctl {}",
                words.join(" ")
            ));
        }
    }
    None
}

/// A usage error found after clap parsed the line: the message, the subcommand's usage
/// hint, exit 2.
fn usage_error(msg: &str, sub: &str) -> u8 {
    eprint_line(&format!(
        "clusterctl: error: {msg}\n\nFor more information, try 'clusterctl {sub} --help'."
    ));
    exit::USAGE
}

/// `clusterctl man [SUBCOMMAND] [--dir DIR]`.
fn man(a: &cli::ManArgs) -> error::Result<()> {
    let io = |context: String| move |e| error::Error::Io { context, source: e };
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    if let Some(dir) = &a.dir {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        clap_mangen::generate_to(cmd.clone(), dir).map_err(io(format!(
            "cannot write the man pages into {}",
            dir.display()
        )))?;
        let mut names = vec!["clusterctl.1".to_string()];
        names.extend(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| format!("clusterctl-{}.1", s.get_name())),
        );
        eprint_line(&format!(
            "wrote {} pages into {}: {}",
            names.len(),
            dir.display(),
            names.join(" ")
        ));
        return Ok(());
    }
    let page = match &a.page {
        None => cmd,
        Some(name) => cmd.find_subcommand(name).cloned().ok_or_else(|| {
            error::Error::config(format!("no subcommand {name:?}; see `clusterctl --help`"))
        })?,
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(io("cannot render the man page".into()))?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> error::Result<()> {
    use std::io::Write;
    std::io::stdout()
        .write_all(bytes)
        .map_err(|e| error::Error::Io {
            context: "cannot write to stdout".into(),
            source: e,
        })
}

/// `clusterctl logs`: runs journalctl with the matches for the unit or one worker slot.
fn logs(a: &cli::LogsArgs) -> error::Result<()> {
    use std::os::unix::process::CommandExt;
    let args = a.journalctl_args();
    if a.print {
        return write_stdout(format!("journalctl {}\n", args.join(" ")).as_bytes());
    }
    let err = std::process::Command::new("journalctl").args(&args).exec();
    Err(error::Error::Io {
        context: "cannot run journalctl".into(),
        source: err,
    })
}

/// Sends one request to a running supervisor, prints its answer; returns the exit code.
fn ctl(target: &cli::Target, request: &control::Request) -> u8 {
    let path = match control::locate(target.app.as_deref(), target.control.as_deref()) {
        Ok(p) => p,
        // No APP, no --control, and no supervisor found by default: a usage error.
        Err(e) if target.app.is_none() && target.control.is_none() => {
            let sub = match request {
                control::Request::Status { .. } => "status",
                control::Request::Reload { rolling: true, .. } => "restart",
                control::Request::Reload { .. } => "reload",
                control::Request::Scale(_) => "scale",
                control::Request::Upgrade { .. } => "upgrade",
            };
            return usage_error(
                &format!(
                    "{e}\nhint: name the supervisor: `clusterctl {sub} APP` for a unit \
                     (APP.service), or `clusterctl {sub} --control PATH` for one started by \
                     hand with `clusterctl run --control PATH`"
                ),
                sub,
            );
        }
        Err(e) => return report(&e),
    };
    let waits = matches!(request, control::Request::Reload { wait: true, .. });
    // Reloads may take as long as the workers' ready timeout; an upgrade as long as the
    // new binary takes to start (a cold page cache, a loaded host); anything else is instant.
    let timeout = if matches!(request, control::Request::Upgrade { .. }) {
        Some(std::time::Duration::from_secs(60))
    } else {
        (!waits).then(|| std::time::Duration::from_secs(10))
    };
    match control::call(&path, request, timeout) {
        Ok(answer) => {
            let answer = answer.trim_end();
            if answer.is_empty() {
                return exit::OK;
            }
            match write_stdout(format!("{answer}\n").as_bytes()) {
                Ok(()) => exit::OK,
                Err(e) => report(&e),
            }
        }
        Err(e) => report(&e),
    }
}

fn report(e: &error::Error) -> u8 {
    eprint_line(&format!("clusterctl: error: {e}"));
    e.exit_code()
}

/// One line to stderr. Never the print macros: they panic when the stream is
/// broken, and `panic = "abort"` would turn a closed terminal into SIGABRT.
fn eprint_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
