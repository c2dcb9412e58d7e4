//! The validated settings (the "high-level arguments", after ripgrep's lowargs → hiargs):
//! `Settings::new` is the ONE function that checks the supervisor's options against each
//! other and against the socket paths, for both `run` and `gen-units`, so a unit that
//! `gen-units` writes is a command line `run` accepts. It also derives what follows from
//! the options (systemd's start and stop timeouts), and `Settings::to_args` is the one
//! place options are turned back into argv (`ExecStart=`, the units' header).
//!
//! Values holding a `Settings` are validated: there is no other way to build one.

pub mod path;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{LogTarget, RunArgs, SupervisorOpts};
use crate::config::{Dur, ListenSpec, ReadyMode};
use crate::error::{Error, Result};

/// A slot that fails to start this many times in a row gives up (the state machine), and
/// systemd's start timeout leaves room for that many attempts (the units).
pub const START_ATTEMPTS: u32 = 3;

/// The shortest `--worker-watchdog`: below it, a worker spends its time pinging.
pub const MIN_WORKER_WATCHDOG: Duration = Duration::from_millis(10);

/// systemd's `TimeoutStartSec=` is this much above clusterctl's own give-up time, so
/// clusterctl reports a failed start itself.
pub const START_MARGIN: Duration = Duration::from_secs(30);

/// systemd's `TimeoutStopSec=` is this much above `--stop-timeout`, for clusterctl to kill
/// and reap stragglers before systemd does.
pub const STOP_MARGIN: Duration = Duration::from_secs(15);

/// The unix sockets the supervisor will bind itself, for the `sun_path` length check:
/// `--control` (or the unit's default) and the runtime directory of its notify socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketPaths<'a> {
    pub control: Option<&'a Path>,
    pub runtime_dir: Option<&'a Path>,
}

/// The supervisor's options, checked. Read through `Deref` (`settings.ready_timeout`);
/// built only by `Settings::new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    opts: SupervisorOpts,
}

impl std::ops::Deref for Settings {
    type Target = SupervisorOpts;

    fn deref(&self) -> &SupervisorOpts {
        &self.opts
    }
}

impl Settings {
    /// Every rule between options: the one place, used by `run` (exit 78 at start) and by
    /// `gen-units` (before anything is rendered). The error says what to change.
    pub fn new(
        opts: &SupervisorOpts,
        listen: &[ListenSpec],
        sockets: SocketPaths<'_>,
    ) -> std::result::Result<Settings, String> {
        if opts.ready_timeout.0.is_zero() {
            return Err(
                "--ready-timeout 0 would kill every worker before it could become ready: give \
                 a positive duration (default 60s)"
                    .into(),
            );
        }
        if opts.restart_delay.max.is_zero() {
            return Err(format!(
                "--restart-delay {} means no backoff at all: a worker that crashes at start \
                 would be respawned in a busy loop. MAX must be above 0 (default 100ms..30s; \
                 0..1ms refills at once)",
                opts.restart_delay
            ));
        }
        if let ReadyMode::After(d) = opts.ready
            && d >= opts.ready_timeout.0
        {
            return Err(format!(
                "--ready after:{} can never be reached: a worker not ready within \
                 --ready-timeout {} is killed first. Give --ready-timeout longer than the \
                 readiness delay (e.g. --ready-timeout {})",
                Dur(d),
                opts.ready_timeout,
                Dur(d * 2 + Duration::from_secs(10))
            ));
        }
        if let Some(w) = opts.worker_watchdog
            && w.0 < MIN_WORKER_WATCHDOG
        {
            return Err(format!(
                "--worker-watchdog {w} is too short: workers would do nothing but ping. Give \
                 at least {} (e.g. --worker-watchdog 10s), or leave it out",
                Dur(MIN_WORKER_WATCHDOG)
            ));
        }
        crate::config::check_listen_unique(listen)?;
        crate::config::check_socket_paths(sockets.control, sockets.runtime_dir)?;
        Ok(Settings { opts: opts.clone() })
    }

    /// The `clusterctl run` options that reproduce these settings, defaults left out: the
    /// only place options become argv again (`ExecStart=`, the units' header, round-trip
    /// tested over every clap argument of `run`).
    pub fn to_args(&self) -> Vec<String> {
        // Destructured, not accessed by field: a new option that is not rendered here is a
        // compile error.
        let SupervisorOpts {
            workers,
            ready,
            ready_timeout,
            restart_delay,
            stop_signal,
            stop_timeout,
            reload_strategy,
            worker_watchdog,
            exit_idle_after,
            min_uptime,
            max_worker_memory,
            max_worker_age,
        } = &self.opts;
        let d = SupervisorOpts::default();
        let mut out = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(value) = value {
                out.extend([format!("--{flag}"), value]);
            }
        };
        push("workers", changed(workers, &d.workers));
        push("ready", changed(ready, &d.ready));
        push("ready-timeout", changed(ready_timeout, &d.ready_timeout));
        push("restart-delay", changed(restart_delay, &d.restart_delay));
        push("stop-signal", changed(stop_signal, &d.stop_signal));
        push("stop-timeout", changed(stop_timeout, &d.stop_timeout));
        push("min-uptime", changed(min_uptime, &d.min_uptime));
        push(
            "reload-strategy",
            (*reload_strategy != d.reload_strategy).then(|| value_name(reload_strategy)),
        );
        push("worker-watchdog", worker_watchdog.map(|v| v.to_string()));
        push("exit-idle-after", exit_idle_after.map(|v| v.to_string()));
        push(
            "max-worker-memory",
            max_worker_memory.map(|v| v.to_string()),
        );
        push("max-worker-age", max_worker_age.map(|v| v.to_string()));
        out
    }

    /// How long one start attempt of a worker may take: not ready within `--ready-timeout`,
    /// or ready but not up for `--min-uptime`, and it counts as failed.
    pub fn start_attempt(&self) -> Duration {
        self.ready_timeout.0 + self.min_uptime.0
    }

    /// systemd's `TimeoutStartSec=` (how long it waits for READY=1, and for a reload) and
    /// how it is made up, for the comment above it: above clusterctl's own limit for the
    /// first generation (`START_ATTEMPTS` attempts plus the backoff between them), so
    /// clusterctl gives up and reports the failure itself before systemd's timer fires.
    pub fn timeout_start(&self) -> (Dur, String) {
        let attempt = self.start_attempt();
        let backoff: Duration = (0..START_ATTEMPTS - 1)
            .map(|i| (self.restart_delay.min * 2u32.pow(i)).min(self.restart_delay.max))
            .sum();
        let total = attempt * START_ATTEMPTS + backoff + START_MARGIN;
        // Whole seconds, rounded up: easier to read in the unit file.
        let total = Dur(Duration::from_secs(
            total.as_secs() + u64::from(total.subsec_nanos() > 0),
        ));
        let why = format!(
            "{START_ATTEMPTS} start attempts x (--ready-timeout {} + --min-uptime {})\n# + {} \
             backoff between them + {} margin",
            self.ready_timeout,
            self.min_uptime,
            Dur(backoff),
            Dur(START_MARGIN)
        );
        (total, why)
    }

    /// systemd's `TimeoutStopSec=`: above `--stop-timeout`, so the workers get their full
    /// drain time and clusterctl can kill stragglers before systemd does.
    pub fn timeout_stop(&self) -> Dur {
        Dur(self.stop_timeout.0 + STOP_MARGIN)
    }
}

/// The value as text when it is not the default.
fn changed<T: PartialEq + std::fmt::Display>(value: &T, default: &T) -> Option<String> {
    (value != default).then(|| value.to_string())
}

/// The name clap knows a `ValueEnum` value by.
fn value_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// `clusterctl run`, checked: the supervisor's settings plus what only `run` has, with the
/// worker program resolved (`path.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    pub opts: Settings,
    pub listen: Vec<ListenSpec>,
    pub reuse_port: bool,
    pub control: Option<PathBuf>,
    pub lazy: bool,
    pub pidfile: Option<PathBuf>,
    pub log: LogTarget,
    /// The worker command as given (`command[0]` is the worker's argv[0]).
    pub command: Vec<OsString>,
    /// The program that is executed: `command[0]` resolved.
    pub program: PathBuf,
    /// Hidden `--resume-from FD`: the hand-over snapshot of `clusterctl upgrade`.
    pub resume_from: Option<i32>,
}

impl RunSettings {
    /// Checks `clusterctl run`'s arguments in this process's environment
    /// (`$RUNTIME_DIRECTORY` for the notify socket, `$PATH` for the program).
    pub fn from_args(args: RunArgs) -> Result<RunSettings> {
        let runtime_dir = crate::config::runtime_directory();
        let path_var = std::env::var_os("PATH");
        RunSettings::from_args_in(args, runtime_dir.as_deref(), path_var.as_deref())
    }

    /// `from_args` with the environment given.
    pub fn from_args_in(
        args: RunArgs,
        runtime_dir: Option<&Path>,
        path_var: Option<&std::ffi::OsStr>,
    ) -> Result<RunSettings> {
        let RunArgs {
            listen,
            reuse_port,
            opts,
            control,
            lazy,
            pidfile,
            log,
            command,
            resume_from,
        } = args;
        let sockets = SocketPaths {
            control: control.as_deref(),
            runtime_dir,
        };
        let opts = Settings::new(&opts, &listen, sockets).map_err(Error::Config)?;
        let first = command
            .first()
            .ok_or_else(|| Error::config("the worker command is missing (after --)"))?;
        let program = path::resolve_program(first, path_var, path::RunsOn::ThisMachine)
            .map_err(Error::Config)?;
        Ok(RunSettings {
            opts,
            listen,
            reuse_port,
            control,
            lazy,
            pidfile,
            log,
            command,
            program,
            resume_from,
        })
    }

    /// The `clusterctl run …` arguments (after the program name) that reproduce these
    /// settings, defaults left out (what the round-trip test renders and parses back).
    #[cfg(test)]
    pub fn to_args(&self) -> Vec<OsString> {
        let RunSettings {
            opts,
            listen,
            reuse_port,
            control,
            lazy,
            pidfile,
            log,
            command,
            program: _,
            resume_from,
        } = self;
        let mut out: Vec<OsString> = vec!["run".into()];
        for l in listen {
            out.push("--listen".into());
            out.push(match &l.name {
                Some(name) => format!("{name}={}", l.raw).into(),
                None => l.raw.clone().into(),
            });
        }
        if *reuse_port {
            out.push("--reuse-port".into());
        }
        out.extend(opts.to_args().into_iter().map(OsString::from));
        if let Some(c) = control {
            out.extend(["--control".into(), c.clone().into_os_string()]);
        }
        if *lazy {
            out.push("--lazy".into());
        }
        if let Some(p) = pidfile {
            out.extend(["--pidfile".into(), p.clone().into_os_string()]);
        }
        if *log != LogTarget::Auto {
            out.extend(["--log".into(), value_name(log).into()]);
        }
        // Hidden: only `clusterctl upgrade` passes it, to the binary it executes.
        if let Some(fd) = resume_from {
            out.extend(["--resume-from".into(), fd.to_string().into()]);
        }
        out.push("--".into());
        out.extend(command.iter().cloned());
        out
    }
}

#[cfg(test)]
mod tests;
