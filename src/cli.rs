//! The command line: clap definitions only. Values are validated by the types in
//! `config.rs`; turning them into a running supervisor happens in `supervisor/`.
//!
//! `SupervisorOpts` is flattened into both `run` and `gen-units`, so every supervisor option
//! is spelled the same in both and `gen-units` can always render it into `ExecStart=`.

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Dur, ListenSpec, ReadyMode, RestartDelay, Sig, Workers};

#[derive(Debug, Parser)]
#[command(
    name = "clusterctl",
    version,
    about = "Run any network server as a multi-process, zero-downtime service under systemd",
    long_about = None,
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage error, 69 supervisor not \
                  reachable, 78 configuration error.\nSee `clusterctl COMMAND --help` for examples."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Supervise N workers sharing the listening sockets (the unit's ExecStart=)
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Render APP.socket and APP.service for this command
    #[command(name = "gen-units", after_help = crate::units::GEN_UNITS_EXAMPLES)]
    GenUnits(Box<crate::units::GenUnitsArgs>),
}

const RUN_EXAMPLES: &str = "Examples:
  # 4 workers of a Python server on port 8080, started by hand:
  clusterctl run --listen 127.0.0.1:8080 --workers 4 -- python3 -m myserver

  # Under systemd (sockets come from APP.socket through LISTEN_FDS):
  ExecStart=/usr/bin/clusterctl run --workers auto -- /usr/bin/myserver --config /etc/my.toml

  # A server that cannot signal readiness: ready 2s after start
  clusterctl run --listen 8080 --ready after:2s -- ./server

Workers receive LISTEN_FDS, LISTEN_PID (their own pid), LISTEN_FDNAMES, WORKER_ID (slot,
0-based), CLUSTER_WORKERS, CLUSTER_GENERATION and NOTIFY_SOCKET (the supervisor's).";

/// Options of the supervisor that `gen-units` renders into `ExecStart=`.
#[derive(Debug, Clone, Args)]
pub struct SupervisorOpts {
    /// Number of workers, or `auto` for one per CPU available to the process
    #[arg(long, value_name = "N|auto", default_value = "auto")]
    pub workers: Workers,

    /// When a worker counts as ready: `notify` (it sends READY=1), `exec`, or `after:DUR`
    #[arg(long, value_name = "MODE", default_value = "notify")]
    pub ready: ReadyMode,

    /// A worker not ready within this time is killed and counts as a failed start
    #[arg(long, value_name = "DUR", default_value = "60s")]
    pub ready_timeout: Dur,

    /// Backoff bounds before refilling the slot of a crashed worker
    #[arg(long, value_name = "MIN..MAX", default_value = "100ms..30s")]
    pub restart_delay: RestartDelay,

    /// Signal that asks a worker to drain and exit
    #[arg(long, value_name = "SIG", default_value = "TERM")]
    pub stop_signal: Sig,

    /// How long stopping workers may drain before they are killed
    #[arg(long, value_name = "DUR", default_value = "30s")]
    pub stop_timeout: Dur,
}

impl SupervisorOpts {
    /// The `clusterctl run` arguments that reproduce these options (defaults left out).
    pub fn to_run_args(&self) -> Vec<String> {
        let defaults = SupervisorOpts::default();
        let mut out = Vec::new();
        let mut push = |flag: &str, value: String, default: String| {
            if value != default {
                out.push(format!("--{flag}"));
                out.push(value);
            }
        };
        push(
            "workers",
            self.workers.to_string(),
            defaults.workers.to_string(),
        );
        push("ready", self.ready.to_string(), defaults.ready.to_string());
        push(
            "ready-timeout",
            self.ready_timeout.to_string(),
            defaults.ready_timeout.to_string(),
        );
        push(
            "restart-delay",
            self.restart_delay.to_string(),
            defaults.restart_delay.to_string(),
        );
        push(
            "stop-signal",
            self.stop_signal.to_string(),
            defaults.stop_signal.to_string(),
        );
        push(
            "stop-timeout",
            self.stop_timeout.to_string(),
            defaults.stop_timeout.to_string(),
        );
        out
    }
}

impl Default for SupervisorOpts {
    fn default() -> Self {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            opts: SupervisorOpts,
        }
        Wrap::parse_from(["x"]).opts
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogTarget {
    /// journald when stderr is connected to the journal ($JOURNAL_STREAM), else stderr
    Auto,
    /// Structured entries to journald (fields WORKER_ID, GENERATION, WORKER_PID)
    Journald,
    /// Readable lines on stderr
    Stderr,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Socket to bind when not started by systemd socket activation:
    /// PORT, HOST:PORT, [V6]:PORT or unix:/PATH, optionally named NAME=ADDRESS (repeatable)
    #[arg(long = "listen", value_name = "SPEC")]
    pub listen: Vec<ListenSpec>,

    /// Set SO_REUSEPORT on sockets clusterctl binds, so a second supervisor can bind the
    /// same port during a side-by-side upgrade
    #[arg(long)]
    pub reuse_port: bool,

    #[command(flatten)]
    pub opts: SupervisorOpts,

    /// Where clusterctl's own log goes
    #[arg(long, value_enum, value_name = "TARGET", default_value = "auto")]
    pub log: LogTarget,

    /// The worker command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn default_opts_render_no_args() {
        assert!(SupervisorOpts::default().to_run_args().is_empty());
    }

    #[test]
    fn non_default_opts_round_trip() {
        let cli = Cli::try_parse_from([
            "clusterctl",
            "run",
            "--workers",
            "3",
            "--ready",
            "after:2s",
            "--stop-timeout",
            "5s",
            "--stop-signal",
            "QUIT",
            "--",
            "srv",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!()
        };
        let args = run.opts.to_run_args();
        assert_eq!(
            args,
            [
                "--workers",
                "3",
                "--ready",
                "after:2s",
                "--stop-signal",
                "SIGQUIT",
                "--stop-timeout",
                "5s"
            ]
        );
        let mut again = vec!["clusterctl".to_string(), "run".into()];
        again.extend(args.iter().cloned());
        again.extend(["--".into(), "srv".into()]);
        let Command::Run(run2) = Cli::try_parse_from(again).unwrap().command else {
            panic!()
        };
        assert_eq!(run2.opts.to_run_args(), args);
    }

    #[test]
    fn rejects_zero_workers_and_missing_command() {
        assert!(Cli::try_parse_from(["clusterctl", "run", "--workers", "0", "--", "x"]).is_err());
        assert!(Cli::try_parse_from(["clusterctl", "run", "--workers", "2"]).is_err());
    }
}
