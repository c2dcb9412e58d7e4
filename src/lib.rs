//! clusterctl: run any network server as a multi-process, zero-downtime service under systemd.
//!
//! The binary is a thin wrapper around [`main`]; the modules are public only so that
//! documentation and tests can reach them.

pub mod cli;
pub mod config;
pub mod error;
pub mod log;
pub mod notify;
pub mod sockets;
pub mod supervisor;
mod sys;
pub mod units;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::exit;

/// Runs clusterctl with these arguments and returns the process exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
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
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("clusterctl: error: {e}");
            e.exit_code()
        }
    }
}
