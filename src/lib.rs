//! clusterctl: run any network server as a multi-process, zero-downtime service under systemd.
//!
//! The binary is a thin wrapper around [`main`]; the modules are public only so that
//! documentation and tests can reach them.

pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod idle;
pub mod journal;
pub mod log;
pub mod notify;
pub mod sockets;
pub mod status;
pub mod supervisor;
mod sys;
pub mod units;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::exit;

/// Runs clusterctl with these arguments and returns the process exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    // Before anything opens a file: a closed fd 0-2 would be taken by the next socket.
    sys::ensure_std_fds();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    let result = match cli.command {
        Command::Run(args) => match supervisor::run(args) {
            Ok(0) => Ok(()),
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::GenUnits(args) => units::gen_units(&args),
        Command::Reload(a) => ctl(
            &a.target,
            control::Request::Reload {
                rolling: false,
                wait: a.wait,
            },
        ),
        Command::Restart(a) => ctl(
            &a.target,
            control::Request::Reload {
                rolling: a.rolling,
                wait: a.wait,
            },
        ),
        Command::Status(a) => ctl(&a.target, control::Request::Status { json: a.json }),
        Command::Logs(a) => logs(&a),
        Command::Man => {
            let mut out = Vec::new();
            let r =
                clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut out);
            r.map_err(|e| error::Error::Io {
                context: "cannot render the man page".into(),
                source: e,
            })
            .and_then(|()| write_stdout(&out))
        }
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
            Ok((target, n)) => ctl(&target, control::Request::Scale(n.resolve())),
            Err(e) => Err(error::Error::config(e)),
        },
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            // Never println!/eprintln! (they panic when the stream is broken).
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "clusterctl: error: {e}");
            e.exit_code()
        }
    }
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

/// Sends one request to a running supervisor and prints its answer.
fn ctl(target: &cli::Target, request: control::Request) -> error::Result<()> {
    let path = control::locate(target.app.as_deref(), target.control.as_deref())?;
    let waits = matches!(request, control::Request::Reload { wait: true, .. });
    // Reloads may take as long as the workers' ready timeout; anything else is instant.
    let timeout = (!waits).then(|| std::time::Duration::from_secs(10));
    let answer = control::call(&path, &request, timeout)?;
    let answer = answer.trim_end();
    if answer.is_empty() {
        return Ok(());
    }
    write_stdout(format!("{answer}\n").as_bytes())
}
