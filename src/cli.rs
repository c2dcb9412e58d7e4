//! The command line: clap definitions only (the "low-level arguments"). Each value is
//! checked alone by its type in `config.rs`; the rules between options and the derived
//! values live in `settings/`, which turns `RunArgs` / `SupervisorOpts` into `Settings`.
//!
//! `SupervisorOpts` is flattened into both `run` and `gen-units`, so every supervisor option
//! is spelled the same in both and `gen-units` can always render it into `ExecStart=`
//! (`Settings::to_args`, the only place options become argv again).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum, ValueHint};

use crate::config::{
    AgeLimit, Dur, ListenSpec, LogRateLimit, ReadyMode, RestartDelay, Sig, Size, VersionArg,
    Workers,
};

/// A value parser for a `FromStr` type that also lists typical values, so `--help` and the
/// shell completions offer them (the type itself accepts more, e.g. any `after:DUR`).
#[derive(Debug, Clone, Copy)]
pub struct Hinted<T> {
    values: &'static [(&'static str, &'static str)],
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T> Hinted<T> {
    pub const fn new(values: &'static [(&'static str, &'static str)]) -> Self {
        Hinted {
            values,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T> TypedValueParser for Hinted<T>
where
    T: std::str::FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let text = value.to_string_lossy();
        text.parse::<T>().map_err(|e| {
            let name = arg.map_or_else(
                || "the value".to_string(),
                |a| format!("'--{}'", a.get_long().unwrap_or(a.get_id().as_str())),
            );
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{text}' for {name}: {e}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(self.values.iter().map(|(v, help)| match *help {
            "" => PossibleValue::new(*v),
            help => PossibleValue::new(*v).help(help),
        })))
    }
}

const READY_VALUES: &[(&str, &str)] = &[
    ("notify", "the worker sends READY=1 to $NOTIFY_SOCKET"),
    ("exec", "ready as soon as the command was executed"),
    ("after:2s", "ready once alive this long (any duration)"),
];

const SIGNAL_VALUES: &[(&str, &str)] = &[
    ("TERM", "the default"),
    ("INT", ""),
    ("QUIT", "graceful stop for unicorn, nginx-style servers"),
    ("HUP", ""),
    ("USR1", ""),
    ("USR2", ""),
    ("WINCH", "graceful stop for Apache-style servers"),
];

const SYSTEMD_VERSION_VALUES: &[(&str, &str)] = &[
    ("auto", "ask `systemctl --version` on this machine"),
    ("239", "RHEL 8, the oldest supported"),
    ("252", "Debian 12"),
    ("255", "Ubuntu 24.04"),
    ("257", "Debian 13"),
];

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
// Parsed once at start: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Supervise N workers sharing the listening sockets (the unit's ExecStart=)
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Render APP.socket and APP.service for this command
    #[command(name = "gen-units", after_help = GEN_UNITS_EXAMPLES)]
    GenUnits(Box<GenUnitsArgs>),
    /// Start a new worker generation on the same sockets, then drain the old one
    #[command(after_help = RELOAD_EXAMPLES)]
    Reload(ReloadArgs),
    /// Re-execute the supervisor (the clusterctl binary now on disk, or --binary) in the
    /// same pid, keeping its workers, sockets and state
    #[command(after_help = UPGRADE_EXAMPLES)]
    Upgrade(UpgradeArgs),
    /// Restart all workers: `--rolling` replaces one slot at a time (new before old)
    #[command(after_help = RESTART_EXAMPLES)]
    Restart(RestartArgs),
    /// Show the supervisor, its sockets and a table of its workers
    #[command(after_help = STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// Change the number of workers of a running supervisor
    #[command(after_help = SCALE_EXAMPLES)]
    Scale(ScaleArgs),
    /// Show a unit's log, all of it or one worker slot's (runs journalctl)
    #[command(after_help = LOGS_EXAMPLES)]
    Logs(LogsArgs),
    /// Print a man page (roff), or write one page per subcommand into a directory
    #[command(
        after_help = "Examples:\n  clusterctl man --dir /usr/local/share/man/man1   \
                            # clusterctl.1, clusterctl-run.1, …\n  \
                            clusterctl man gen-units | man -l -"
    )]
    Man(ManArgs),
    /// Print a shell completion script
    #[command(
        after_help = "Examples:\n  clusterctl completions bash > /etc/bash_completion.d/clusterctl\n  \
                            clusterctl completions zsh > \"${fpath[1]}/_clusterctl\""
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Only this subcommand's page (default: the top page, clusterctl(1))
    #[arg(value_name = "SUBCOMMAND")]
    pub page: Option<String>,
    /// Write clusterctl.1 and one clusterctl-SUBCOMMAND.1 per subcommand into DIR
    /// (created if missing) instead of printing
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath, conflicts_with = "page")]
    pub dir: Option<PathBuf>,
}

const LOGS_EXAMPLES: &str = "Examples:
  clusterctl logs myapp                 # supervisor and all workers
  clusterctl logs myapp --worker 2 -f   # worker 2's own output plus the supervisor's events
                                        # about slot 2, following
The same without clusterctl:
  journalctl -u myapp -t myapp/2        # worker 2's own output
  journalctl -u myapp WORKER_ID=2       # the supervisor's events about slot 2";

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The unit name
    #[arg(value_name = "APP")]
    pub app: String,
    /// Only this worker slot (its own output and the supervisor's events about it)
    #[arg(long, value_name = "N")]
    pub worker: Option<u32>,
    /// Follow new entries
    #[arg(short, long)]
    pub follow: bool,
    /// The unit is a user unit (journalctl --user)
    #[arg(long)]
    pub user: bool,
    /// Print the journalctl command instead of running it
    #[arg(long)]
    pub print: bool,
}

impl LogsArgs {
    /// The journalctl arguments for this request.
    pub fn journalctl_args(&self) -> Vec<String> {
        let app = self.app.strip_suffix(".service").unwrap_or(&self.app);
        let unit = format!("_SYSTEMD_UNIT={app}.service");
        let mut a = Vec::new();
        if self.user {
            a.push("--user".to_string());
        }
        if self.follow {
            a.push("--follow".into());
        }
        match self.worker {
            None => a.push(format!("--unit={app}.service")),
            Some(n) => {
                a.extend([
                    unit.clone(),
                    format!("SYSLOG_IDENTIFIER={app}/{n}"),
                    "+".into(),
                ]);
                a.extend([unit, format!("WORKER_ID={n}")]);
            }
        }
        a
    }
}

const RELOAD_EXAMPLES: &str = "Examples:
  clusterctl reload myapp                 # ask and return at once (like SIGHUP)
  clusterctl reload --wait myapp          # wait; exit 0 if the new generation serves,
                                          # 1 if it failed and was rolled back
  clusterctl reload --wait --control /run/myapp/control.sock

A reload asked for while one runs is coalesced into one more reload after it.";

const RESTART_EXAMPLES: &str = "Examples:
  clusterctl restart --rolling --wait myapp   # one slot at a time, at most N+1 workers
  kill -USR2 $(systemctl show -P MainPID myapp)   # the same, by signal";

const STATUS_EXAMPLES: &str = "Examples:
  clusterctl status myapp
  clusterctl status --json myapp | jq '.workers[] | {slot, pid, state}'
  kill -USR1 $(systemctl show -P MainPID myapp)   # the same table into the journal";

const SCALE_EXAMPLES: &str = "Examples:
  clusterctl scale myapp 8
  kill -TTIN $(systemctl show -P MainPID myapp)   # one more worker
  kill -TTOU $(systemctl show -P MainPID myapp)   # one fewer (the highest slot drains)

The new count lasts until the supervisor restarts; then the unit's --workers stands.";

/// How to find a running supervisor.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The unit name: its control socket is /run/APP/control.sock
    /// (or $XDG_RUNTIME_DIR/APP/control.sock for user units)
    #[arg(value_name = "APP")]
    pub app: Option<String>,
    /// The control socket's path (`clusterctl run --control PATH`)
    #[arg(long, value_name = "PATH", conflicts_with = "app", value_hint = ValueHint::FilePath)]
    pub control: Option<PathBuf>,
}

const UPGRADE_EXAMPLES: &str = "Examples:
  clusterctl upgrade myapp --wait               # after installing a new clusterctl
  clusterctl upgrade myapp --binary /opt/clusterctl-new --wait

The supervisor execs the new binary in the same pid (systemd's MainPID does not change)
and hands it its state; the workers keep running. Without --wait the answer comes once the
exec is under way; with --wait, from the new binary once it resumed (its version). Exit 1
if the binary cannot be executed: the old supervisor keeps running unchanged.";

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub target: Target,
    /// Wait until the new binary resumed; print its version
    #[arg(long)]
    pub wait: bool,
    /// Execute this binary instead of the one the supervisor was started from
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub target: Target,
    /// Wait until the reload finished; exit non-zero if it failed (for ExecReload=)
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    #[command(flatten)]
    pub target: Target,
    /// Replace one slot at a time instead of a whole generation at once
    #[arg(long)]
    pub rolling: bool,
    /// Wait until the restart finished; exit non-zero if it failed
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Machine-readable output (stable schema, see README)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The control socket's path (instead of APP)
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub control: Option<PathBuf>,
    /// `APP N` (the unit name and the new number of workers), or just `N` with --control
    #[arg(value_name = "APP N", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
}

impl ScaleArgs {
    /// Splits the positionals into the target and the worker count.
    pub fn split(&self) -> Result<(Target, Workers), String> {
        let (app, n) = match (self.args.as_slice(), &self.control) {
            ([n], Some(_)) => (None, n),
            ([app, n], None) => (Some(app.clone()), n),
            ([_], None) => {
                return Err("give the unit name and the count: `clusterctl scale APP N`".into());
            }
            _ => return Err("give either APP or --control PATH, then N".into()),
        };
        Ok((
            Target {
                app,
                control: self.control.clone(),
            },
            n.parse()?,
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReloadStrategy {
    /// Start a complete new generation, then drain the old one (2N workers briefly)
    Surge,
    /// Replace one slot at a time, new before old (at most N+1 workers)
    Rolling,
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
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct SupervisorOpts {
    /// Number of workers, or `auto` for one per CPU available to the process
    #[arg(long, value_name = "N|auto", default_value = "auto")]
    pub workers: Workers,

    /// When a worker counts as ready: `notify` (it sends READY=1), `exec`, or `after:DUR`
    #[arg(long, value_name = "MODE", default_value = "notify",
          value_parser = Hinted::<ReadyMode>::new(READY_VALUES))]
    pub ready: ReadyMode,

    /// A worker not ready within this time is killed and counts as a failed start (more
    /// than 0, and longer than `--ready after:DUR`)
    #[arg(long, value_name = "DUR", default_value = "60s")]
    pub ready_timeout: Dur,

    /// Backoff bounds before refilling the slot of a crashed worker (MAX above 0)
    #[arg(long, value_name = "MIN..MAX", default_value = "100ms..30s")]
    pub restart_delay: RestartDelay,

    /// Signal that asks a worker to drain and exit (any signal name or number)
    #[arg(long, value_name = "SIG", default_value = "TERM",
          value_parser = Hinted::<Sig>::new(SIGNAL_VALUES))]
    pub stop_signal: Sig,

    /// How long stopping workers may drain before they are killed
    #[arg(long, value_name = "DUR", default_value = "30s")]
    pub stop_timeout: Dur,

    /// How SIGHUP / `clusterctl reload` replace the workers
    #[arg(long, value_enum, value_name = "STRATEGY", default_value = "surge")]
    pub reload_strategy: ReloadStrategy,

    /// Workers get WATCHDOG_USEC and must send WATCHDOG=1 this often; a silent worker gets
    /// SIGABRT, then SIGKILL, and is replaced
    #[arg(long, value_name = "DUR")]
    pub worker_watchdog: Option<Dur>,

    /// Stop the workers and exit 0 when no connection was queued or open for this long
    /// (under systemd the socket unit starts the service again on the next connection)
    #[arg(long, value_name = "DUR")]
    pub exit_idle_after: Option<Dur>,

    /// A worker counts as started only once it stayed up this long after it was ready; one
    /// that dies sooner is a failed start (a reload rolls back; 0 turns this off)
    #[arg(long, value_name = "DUR", default_value = "1s")]
    pub min_uptime: Dur,

    /// Replace a worker (new before old) whose resident memory, with its children's, stays
    /// above SIZE (e.g. 512M, 1G) in two samples 5s apart
    #[arg(long, value_name = "SIZE")]
    pub max_worker_memory: Option<Size>,

    /// Replace a worker (new before old) once it is this old; `6h±10%` gives each worker
    /// its own limit within 10% of 6h, so slots do not recycle together
    #[arg(long, value_name = "DUR[±P%]")]
    pub max_worker_age: Option<AgeLimit>,
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
    /// Sockets to bind when not started through systemd socket activation.
    #[arg(
        long = "listen",
        value_name = "SPEC",
        help = "Socket to bind when not started by systemd socket activation: PORT, HOST:PORT, \
                [V6]:PORT or unix:/PATH, optionally named NAME=ADDRESS (repeatable). A bare \
                PORT listens on every interface, IPv4 and IPv6 ([::]:PORT); use \
                127.0.0.1:PORT for this machine only"
    )]
    pub listen: Vec<ListenSpec>,

    /// Set SO_REUSEPORT on sockets clusterctl binds, so a second supervisor can bind the
    /// same port during a side-by-side upgrade
    #[arg(long)]
    pub reuse_port: bool,

    #[command(flatten)]
    pub opts: SupervisorOpts,

    /// Control socket for `clusterctl reload/status/scale` [default: $RUNTIME_DIRECTORY/control.sock]
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub control: Option<PathBuf>,

    /// Hold only the sockets until the first connection, then start the workers; with
    /// --exit-idle-after, stop them when idle and hold the sockets again (no exit)
    #[arg(long)]
    pub lazy: bool,

    /// Write the supervisor's pid here (for use without systemd); removed on exit
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub pidfile: Option<PathBuf>,

    /// Where clusterctl's own log goes
    #[arg(long, value_enum, value_name = "TARGET", default_value = "auto")]
    pub log: LogTarget,

    /// Internal (`clusterctl upgrade`): resume from the hand-over snapshot at this fd
    #[arg(long, value_name = "FD", hide = true)]
    pub resume_from: Option<i32>,

    /// The worker command and its arguments
    #[arg(last = true, required = true, value_name = "CMD",
          value_hint = ValueHint::CommandWithArguments)]
    pub command: Vec<OsString>,
}

pub const GEN_UNITS_EXAMPLES: &str = "Examples:
  # Print the units for 4 workers of a Python server on port 8080 (systemd version of this
  # machine, clusterctl at its current path):
  clusterctl gen-units myapp --listen 8080 --workers 4 -- python3 -m myserver

  # Write them for a Debian 12 host (systemd 252), Node app, JIT-compatible sandboxing:
  clusterctl gen-units web --listen web=127.0.0.1:3000 --hardening jit \\
      --systemd-version 252 --clusterctl /usr/bin/clusterctl \\
      --environment NODE_ENV=production -o /etc/systemd/system -- /usr/bin/node /srv/web/server.js

  # A user service (systemctl --user):
  clusterctl gen-units dev --listen 8000 --user-units -o ~/.config/systemd/user -- ./server

Every argument after -- reaches the worker unchanged: gen-units quotes it for systemd
(spaces, quotes, backslashes, %, $). A relative CMD is resolved now (PATH, or the current
directory for ./x) to an absolute path. -o refuses to replace a file with different content
unless --force is given. See units/README.md for checked-in examples.";

/// `clusterctl gen-units APP [OPTIONS] -- CMD [ARGS...]`.
#[derive(Debug, Args)]
pub struct GenUnitsArgs {
    /// Unit name prefix: renders APP.socket and APP.service (ASCII letters, digits, '_', '.',
    /// '-')
    #[arg(value_name = "APP")]
    pub app: String,

    /// Socket systemd listens on (ListenStream=): PORT, HOST:PORT, `[V6]:PORT` or unix:/PATH,
    /// optionally named NAME=ADDRESS (FileDescriptorName=; one name for all) (repeatable)
    #[arg(long = "listen", value_name = "SPEC", required = true)]
    pub listen: Vec<ListenSpec>,

    #[command(flatten)]
    pub opts: SupervisorOpts,

    /// WatchdogSec=: systemd restarts the service if clusterctl stops pinging this long
    #[arg(long, value_name = "DUR")]
    pub watchdog: Option<Dur>,

    /// Run as this existing user (User=) instead of a dynamic one (DynamicUser=yes)
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Run with this group (Group=)
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,

    /// WorkingDirectory= of clusterctl and its workers (absolute) [default: the directory
    /// gen-units runs in]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub working_directory: Option<PathBuf>,

    /// Environment variable for clusterctl and its workers (Environment=) (repeatable)
    #[arg(long, value_name = "KEY=VALUE")]
    pub environment: Vec<String>,

    /// File of KEY=VALUE lines read by systemd at start (EnvironmentFile=, absolute)
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub environment_file: Option<PathBuf>,

    /// Sandboxing [default: strict, or jit when the worker command is a JIT runtime such as
    /// node, java, dotnet, bun, deno, pypy or luajit]
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub hardening: Option<Hardening>,

    /// systemd version (any from 239 on) of the machine that will run the units
    /// (sandboxing settings newer than it are left out), or `auto` to ask
    /// `systemctl --version` here
    #[arg(long, value_name = "N|auto", default_value = "auto",
          value_parser = Hinted::<VersionArg>::new(SYSTEMD_VERSION_VALUES))]
    pub systemd_version: VersionArg,

    /// journald rate limit of the unit, shared by clusterctl and its workers, as
    /// BURST/INTERVAL (e.g. 10000/30s) [default: off, so clusterctl's own lines are never
    /// dropped because a worker logs a lot]
    #[arg(long, value_name = "BURST/INTERVAL")]
    pub log_rate_limit: Option<LogRateLimit>,

    /// Description= of the service (default: "APP (clusterctl)")
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// Render units for a user manager (systemctl --user): WantedBy=default.target, no
    /// User=/DynamicUser=, only sandboxing that works without privileges
    #[arg(long)]
    pub user_units: bool,

    /// Absolute path of clusterctl on the target machine (default: this binary; see README
    /// "Installing")
    #[arg(long, value_name = "PATH", value_hint = ValueHint::ExecutablePath)]
    pub clusterctl: Option<PathBuf>,

    /// Write APP.socket and APP.service into DIR (created if missing) instead of printing
    /// them
    #[arg(short = 'o', long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub output_dir: Option<PathBuf>,

    /// With -o: replace existing files whose content differs
    #[arg(long, requires = "output_dir")]
    pub force: bool,

    /// The worker command and its arguments
    #[arg(last = true, required = true, value_name = "CMD",
          value_hint = ValueHint::CommandWithArguments)]
    pub command: Vec<OsString>,
}

/// `--hardening strict|jit|none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hardening {
    /// Everything a network server supervised by clusterctl does not need is denied
    /// (`systemd-analyze security` exposure 1.2)
    Strict,
    /// Strict without MemoryDenyWriteExecute= (JIT compilers such as V8, HotSpot, LuaJIT
    /// need memory that is writable, then executable) and ProcSubset=pid (runtimes read
    /// /proc/cpuinfo)
    Jit,
    /// No sandboxing settings at all
    None,
}

impl Hardening {
    pub fn name(self) -> &'static str {
        match self {
            Hardening::Strict => "strict",
            Hardening::Jit => "jit",
            Hardening::None => "none",
        }
    }
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
    fn logs_builds_journalctl_matches() {
        let l = LogsArgs {
            app: "web.service".into(),
            worker: Some(2),
            follow: true,
            user: false,
            print: false,
        };
        assert_eq!(
            l.journalctl_args(),
            [
                "--follow",
                "_SYSTEMD_UNIT=web.service",
                "SYSLOG_IDENTIFIER=web/2",
                "+",
                "_SYSTEMD_UNIT=web.service",
                "WORKER_ID=2"
            ]
        );
        let l = LogsArgs {
            app: "web".into(),
            worker: None,
            follow: false,
            user: true,
            print: false,
        };
        assert_eq!(l.journalctl_args(), ["--user", "--unit=web.service"]);
    }

    #[test]
    fn rejects_zero_workers_and_missing_command() {
        assert!(Cli::try_parse_from(["clusterctl", "run", "--workers", "0", "--", "x"]).is_err());
        assert!(Cli::try_parse_from(["clusterctl", "run", "--workers", "2"]).is_err());
    }
}
