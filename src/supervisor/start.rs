//! `clusterctl run` up to the event loop: options checked and turned into the state
//! machine's `Config`, sockets acquired, the guardian, pidfile and control socket, the
//! signal mask and signalfd, the workers' base environment.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::state::{Config, State};
use super::upgrade::Resume;
use super::{Executor, pidfile};
use crate::control::ControlSocket;
use crate::error::{Context, Result};
use crate::notify::{Complaints, NotifySocket};
use crate::settings::RunSettings;
use crate::sockets::{self, Listeners};
use crate::sys;

/// Environment variables that belong to the supervisor, never to its workers.
const STRIPPED_ENV: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "WORKER_ID",
    "CLUSTER_WORKERS",
    "CLUSTER_GENERATION",
];

/// Signals the supervisor reads from its signalfd (blocked for normal delivery).
const SIGNALS: &[Signal] = &[
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// Runs the supervisor until it is stopped; returns the exit code. `args` were checked by
/// `RunSettings::from_args` (every rule between options, the program resolved).
pub fn run(args: RunSettings) -> Result<u8> {
    // Sockets first: in bind mode they must land at fds 3.. before anything else opens fds.
    // `clusterctl upgrade`: the previous image handed over its fds and state.
    let mut resume = args.resume_from.map(Resume::read).transpose()?;
    let (listeners, warnings) = match resume.as_mut().and_then(|r| r.listeners.take()) {
        Some(l) => (l, Vec::new()),
        None => sockets::acquire(&args.listen, args.reuse_port)?,
    };
    let nofile = sys::raise_nofile();
    // Forked from the main thread before the log thread exists; it keeps none of our fds.
    let guardian = match resume.as_mut() {
        Some(r) => r.guardian.take().ok_or_else(|| {
            std::io::Error::other("the supervisor had none before `clusterctl upgrade`")
        }),
        None => sys::Guardian::start(),
    };
    let log_warning = crate::log::init(args.log);
    for w in warnings.iter().chain(&log_warning) {
        tracing::warn!("{w}");
    }
    if let Err(e) = &nofile {
        tracing::warn!("cannot raise the open-files limit: {e}");
    }
    let guardian = match guardian {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(
                "cannot start the guardian process ({e}): if the supervisor is SIGKILLed, \
                 processes started by workers may outlive it"
            );
            None
        }
    };
    let program = args.program.clone();
    let workers = args.opts.workers.resolve();
    let cfg = Config {
        workers,
        ready: args.opts.ready,
        ready_timeout: args.opts.ready_timeout.0,
        restart: args.opts.restart_delay,
        stop_signal: args.opts.stop_signal.0,
        stop_timeout: args.opts.stop_timeout.0,
        worker_watchdog: args.opts.worker_watchdog.map(|d| d.0),
        exit_idle_after: args.opts.exit_idle_after.map(|d| d.0),
        lazy: args.lazy,
        min_uptime: args.opts.min_uptime.0,
        max_worker_memory: args.opts.max_worker_memory.map(|s| s.0),
        max_worker_age: args.opts.max_worker_age,
        rolling: args.opts.reload_strategy == crate::cli::ReloadStrategy::Rolling,
        systemd_watchdog: crate::notify::watchdog_interval(),
    };
    let pidfile = match &resume {
        // Ours already (same pid): removed on exit, not created again.
        Some(_) => args.pidfile.clone().map(pidfile::Pidfile::adopt),
        None => (args.pidfile.as_deref())
            .map(pidfile::Pidfile::create)
            .transpose()?,
    };
    let adopted = resume.as_mut().map(|r| r.control.take());
    let control = match adopted {
        Some(c) => c,
        None => match args.control.clone().or_else(ControlSocket::default_path) {
            Some(path) => Some(ControlSocket::bind(&path)?),
            // Run by hand: a control socket of its own, found by `clusterctl status`.
            None => match ControlSocket::bind_by_hand(&program) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("no control socket ({e}); give --control PATH to have one");
                    None
                }
            },
        },
    };
    let notify = resume.as_mut().and_then(|r| r.notify.take());
    let mut sup = Executor::new(cfg, listeners, program, args.command, control, notify)?;
    sup.guardian = guardian;
    if let Some(r) = resume {
        r.apply(&mut sup);
    }
    let code = sup.run();
    drop(pidfile);
    code
}

impl Executor {
    pub(super) fn new(
        cfg: Config,
        listeners: Listeners,
        program: PathBuf,
        argv: Vec<OsString>,
        control: Option<ControlSocket>,
        notify: Option<NotifySocket>,
    ) -> Result<Executor> {
        let mut mask = SigSet::empty();
        for s in SIGNALS {
            mask.add(*s);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
            .context(|| "cannot block signals".into())?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .context(|| "cannot create a signalfd".into())?;
        if let Err(e) = sys::set_child_subreaper() {
            tracing::warn!("cannot become a child subreaper: {e}");
        }
        // Handed over by `clusterctl upgrade`: this image resumes, it starts nothing.
        let resuming = notify.is_some();
        let notify = match notify {
            Some(n) => n,
            None => NotifySocket::bind()?,
        };
        let devnull: OwnedFd = std::fs::File::open("/dev/null")
            .context(|| "cannot open /dev/null".into())?
            .into();
        // A JOURNAL_STREAM that does not name our stderr is stale (inherited from a shell
        // started under systemd): workers, which share our stderr or get their own stream,
        // must not believe it.
        let stale_journal = !crate::log::stderr_is_journal();
        let mut base_env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !STRIPPED_ENV.iter().any(|s| k == *s))
            .filter(|(k, _)| !(stale_journal && k == "JOURNAL_STREAM"))
            .collect();
        base_env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
        base_env.push(("LISTEN_FDNAMES".into(), listeners.names.join(":").into()));
        base_env.push(("NOTIFY_SOCKET".into(), notify.path().into()));
        if let Some(wd) = cfg.worker_watchdog {
            base_env.push(("WATCHDOG_USEC".into(), wd.as_micros().to_string().into()));
        }
        tracing::info!(
            "supervisor pid {} {} {} worker(s) of {} on {}",
            std::process::id(),
            if resuming {
                "resuming with"
            } else {
                "starting"
            },
            cfg.workers,
            program.display(),
            listeners
                .names
                .iter()
                .zip(&listeners.addresses)
                .map(|(n, a)| format!("{n}={a}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(c) = &control {
            tracing::info!("control socket {}", c.path().display());
        }
        let now = Instant::now();
        let n_listeners = listeners.len();
        let watched = (cfg.exit_idle_after.is_some() || cfg.lazy)
            .then(|| crate::idle::Watched::from_listeners(listeners.len()));
        let journal_identifier =
            crate::log::stderr_is_journal().then(|| crate::journal::base_identifier(&program));
        if let Some(id) = &journal_identifier {
            tracing::info!("worker output goes to the journal as {id}/SLOT (journalctl -t {id}/0)");
        }
        let mut state = State::new(cfg);
        // Spreads the workers' jittered age limits differently in every run.
        state.seed = u64::from(std::process::id()).rotate_left(32)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()) ^ d.as_secs());
        Ok(Executor {
            state,
            listeners,
            notify,
            signals,
            program,
            argv,
            base_env,
            devnull,
            exit: None,
            complaints: Complaints::default(),
            upstream_failed: false,
            control,
            clients: Vec::new(),
            outgoing: Vec::new(),
            max_clients: crate::control::client_cap(),
            accept_paused: None,
            guardian: None,
            waiting: Vec::new(),
            next_ticket: 1,
            started: now,
            journal_identifier,
            watched,
            accept_watch: crate::idle::Watched::from_listeners(n_listeners),
            unaccepted: std::collections::HashSet::new(),
            child_exited: false,
            pidfds: std::collections::HashMap::new(),
            no_pidfds: false,
            upgrade: None,
            resumed: None,
        })
    }
}
