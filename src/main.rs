//! Entry point: parse the command line, run, map the outcome to an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(clusterctl::main(std::env::args_os()))
}
