//! `clusterctl run`: the executor around the pure state machine.
//!
//! One thread, one `poll(2)` over a signalfd (SIGCHLD, SIGTERM, SIGHUP, …) and the workers'
//! notify socket, with a timeout only when the state machine has a deadline armed: when
//! nothing is going on, the supervisor never wakes up. Each wake-up is decoded into
//! `Event`s, fed to `handle()`, and the returned `Action`s are carried out here.

pub mod event;
mod handle;
pub mod handover;
mod memory;
pub mod state;
mod upgrade;

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use self::event::{Action, Event, ExitKind};
pub use self::handle::handle;
use self::state::{Config, State};
use crate::cli::RunArgs;
use crate::control::{ControlSocket, Request};
use crate::error::{Context, Error, Result};
use crate::notify::{self, Complaints, NotifySocket, Upstream};
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

/// While a reload runs, systemd's reload timeout is pushed out by this much, this often,
/// for as long as the reload is still within `--ready-timeout` and `--min-uptime` (plus a
/// draining old generation's `--stop-timeout`, for a coalesced reload).
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY: Duration = Duration::from_secs(15);

/// Runs the supervisor until it is stopped; returns the exit code.
pub fn run(args: RunArgs) -> Result<u8> {
    // Cross-option rules and socket path lengths, shared with gen-units (config errors, 78).
    args.opts.validate().map_err(Error::Config)?;
    crate::config::check_socket_paths(
        args.control.as_deref(),
        crate::config::runtime_directory().as_deref(),
    )
    .map_err(Error::Config)?;
    // Sockets first: in bind mode they must land at fds 3.. before anything else opens fds.
    // `clusterctl upgrade`: the previous image handed over its fds and state.
    let mut resume = args.resume_from.map(upgrade::Resume::read).transpose()?;
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
    let program = resolve_command(&args.command[0])?;
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
    };
    if cfg
        .worker_watchdog
        .is_some_and(|d| d < Duration::from_millis(10))
    {
        return Err(Error::config("--worker-watchdog must be at least 10ms"));
    }
    let pidfile = match &resume {
        // Ours already (same pid).
        Some(_) => args.pidfile.clone().map(Pidfile),
        None => args.pidfile.as_deref().map(Pidfile::create).transpose()?,
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
    let rolling = args.opts.reload_strategy == crate::cli::ReloadStrategy::Rolling;
    let notify = resume.as_mut().and_then(|r| r.notify.take());
    let mut sup = Executor::new(
        cfg,
        listeners,
        program,
        args.command,
        control,
        rolling,
        notify,
    )?;
    sup.guardian = guardian;
    if let Some(r) = resume {
        r.apply(&mut sup);
    }
    let code = sup.run();
    drop(pidfile);
    code
}

/// `--pidfile`: created exclusively; a stale one (its pid is dead) is replaced; removed on
/// drop.
#[derive(Debug)]
struct Pidfile(PathBuf);

impl Pidfile {
    fn create(path: &Path) -> Result<Pidfile> {
        use std::io::Write;
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id())
                        .context(|| format!("cannot write pidfile {}", path.display()))?;
                    return Ok(Pidfile(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    if text.trim().is_empty() {
                        return Err(Error::config(format!(
                            "pidfile {} exists but is empty: another supervisor may be starting; \
                             remove it if none is",
                            path.display()
                        )));
                    }
                    let alive = text
                        .trim()
                        .parse::<i32>()
                        .ok()
                        .filter(|p| *p > 0)
                        .is_some_and(|p| {
                            // Our own pid in a leftover file (a container restarted us with
                            // the same pid) is stale too.
                            p != std::process::id().cast_signed()
                                && kill(Pid::from_raw(p), None) != Err(nix::Error::ESRCH)
                        });
                    if alive {
                        return Err(Error::config(format!(
                            "pidfile {} names pid {}, which is running: is another supervisor using it?",
                            path.display(),
                            text.trim()
                        )));
                    }
                    tracing::warn!(
                        "replacing stale pidfile {} (pid {:?} is gone)",
                        path.display(),
                        text.trim()
                    );
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => {
                    return Err(e).context(|| format!("cannot create pidfile {}", path.display()));
                }
            }
        }
        Err(Error::Failed(format!(
            "cannot create pidfile {}: it keeps reappearing",
            path.display()
        )))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Finds the worker program now, so that a typo is a clear configuration error at start.
fn resolve_command(cmd: &OsString) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let check = |p: &Path| -> std::result::Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            return Err("is a directory".into());
        }
        // access(X_OK) succeeds for root whenever any execute bit is set, and for a file
        // with none, execve fails even for root.
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
            return Err(std::io::Error::from_raw_os_error(nix::libc::EACCES).to_string());
        }
        nix::unistd::access(p, nix::unistd::AccessFlags::X_OK)
            .map_err(|e| std::io::Error::from(e).to_string())
    };
    let shown = Path::new(cmd).display().to_string();
    if cmd.as_bytes().contains(&b'/') {
        let p = PathBuf::from(cmd);
        check(&p)
            .map_err(|e| Error::config(format!("cannot execute worker command {shown:?}: {e}")))?;
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(cmd);
        if check(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(Error::config(format!(
        "worker command {shown:?} not found in PATH ({}): No such file or directory",
        path.to_string_lossy()
    )))
}

struct Executor {
    state: State,
    listeners: Listeners,
    notify: NotifySocket,
    signals: SignalFd,
    program: PathBuf,
    argv: Vec<OsString>,
    base_env: Vec<(OsString, OsString)>,
    devnull: OwnedFd,
    exit: Option<u8>,
    /// Noise from strangers and garbage datagrams: rate-limited.
    complaints: Complaints,
    upstream_failed: bool,
    control: Option<ControlSocket>,
    /// Control clients whose request line has not fully arrived.
    clients: Vec<crate::control::Client>,
    /// Answers still being written (clients that read slowly).
    outgoing: Vec<crate::control::Outgoing>,
    /// Pending control clients at most (the oldest silent one is closed for a new one).
    max_clients: usize,
    /// The control listener is not polled until then (accept failed: out of fds).
    accept_paused: Option<Instant>,
    /// Kills the workers' process groups if the supervisor is SIGKILLed.
    guardian: Option<sys::Guardian>,
    /// Clients waiting for a reload's outcome (`reload --wait`), by ticket.
    waiting: Vec<(event::Ticket, std::os::unix::net::UnixStream)>,
    next_ticket: event::Ticket,
    /// `--reload-strategy rolling`: SIGHUP and `reload` replace one slot at a time.
    rolling: bool,
    /// systemd's watchdog (WatchdogSec=): ping every half interval.
    watchdog: Option<Duration>,
    next_ping: Option<Instant>,
    next_extend: Option<Instant>,
    started: Instant,
    /// With the journal as stderr: workers get their own streams, identified `NAME/SLOT`.
    journal_identifier: Option<String>,
    /// `--exit-idle-after` / `--lazy`: the listening sockets to sample, and when.
    watched: Option<crate::idle::Watched>,
    /// The TCP listeners, for `Action::ProbeAccepting`, and the connections that waited
    /// in their accept queues at the previous probe.
    accept_watch: crate::idle::Watched,
    unaccepted: std::collections::HashSet<u64>,
    /// A SIGCHLD was read: reap (and feed each exit to the state machine) before any
    /// other event of the batch.
    child_exited: bool,
    sample_every: Duration,
    next_sample: Option<Instant>,
    /// `clusterctl upgrade`: a request to carry out after the current batch, and (in the
    /// new image) what is left to do on resume.
    upgrade: Option<upgrade::Request>,
    resumed: Option<upgrade::Resumed>,
}

impl Executor {
    fn new(
        cfg: Config,
        listeners: Listeners,
        program: PathBuf,
        argv: Vec<OsString>,
        control: Option<ControlSocket>,
        rolling: bool,
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
        let watchdog = watchdog_interval();
        let now = Instant::now();
        let n_listeners = listeners.len();
        let watched = (cfg.exit_idle_after.is_some() || cfg.lazy)
            .then(|| crate::idle::Watched::from_listeners(listeners.len()));
        // A tenth of the idle timeout, within 200 ms .. 5 s.
        let sample_every = cfg.exit_idle_after.map_or(Duration::from_secs(5), |d| {
            (d / 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
        });
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
            rolling,
            watchdog,
            next_ping: watchdog.map(|_| now),
            next_extend: None,
            started: now,
            journal_identifier,
            watched,
            accept_watch: crate::idle::Watched::from_listeners(n_listeners),
            unaccepted: std::collections::HashSet::new(),
            child_exited: false,
            sample_every,
            next_sample: None,
            upgrade: None,
            resumed: None,
        })
    }

    fn run(&mut self) -> Result<u8> {
        match self.resumed.take() {
            Some(r) => self.resumed(r),
            None => self.dispatch(Event::Start),
        }
        while self.exit.is_none() {
            let events = self.wait()?;
            if std::mem::take(&mut self.child_exited) {
                self.reap();
            }
            for e in events {
                if self.exit.is_some() {
                    break;
                }
                self.dispatch(e);
                if self.exit.is_some() {
                    break;
                }
            }
            // Between batches: nothing read is left unhandled.
            if let Some(u) = self.upgrade.take()
                && self.exit.is_none()
            {
                self.upgrade(u);
            }
        }
        Ok(self.exit.unwrap_or(0))
    }

    /// Sleeps until something happens or the next deadline; returns the events.
    fn wait(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.housekeeping(&mut events);
        let idle = self.state.phase == state::Phase::Idle && self.watched.is_some();
        let deadline = [
            self.state.next_deadline(),
            self.next_ping,
            self.next_extend,
            self.next_sample,
            self.clients.iter().map(|c| c.deadline).min(),
            self.outgoing.iter().map(|c| c.deadline).min(),
            self.accept_paused,
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match deadline {
            // Housekeeping produced events: still look at the other inputs (never starve
            // signals and notifications), but do not sleep.
            _ if !events.is_empty() => PollTimeout::ZERO,
            None => PollTimeout::NONE,
            Some(t) => {
                let d = t.saturating_duration_since(Instant::now());
                // Round up, so we never wake a hair before the deadline and spin.
                let ms = d.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(PollTimeout::MAX)
            }
        };
        let (sig_ready, notify_ready, control_ready) = {
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
            ];
            let paused = self.accept_paused.is_some_and(|t| t > Instant::now());
            let control = self.control.is_some() && !paused;
            if let Some(c) = self.control.as_ref().filter(|_| control) {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
            // Control clients whose request is still arriving: served in serve_control.
            for c in &self.clients {
                fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
            }
            // Answers that did not fit at once: finished when the client reads.
            for o in &self.outgoing {
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLOUT));
            }
            // Holding the sockets without workers: a connection makes a listener readable.
            if idle {
                for i in 0..self.listeners.len() {
                    fds.push(PollFd::new(sys::listen_fd(i), PollFlags::POLLIN));
                }
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e).context(|| "poll failed".into()),
            }
            let r = |f: Option<&PollFd>| f.and_then(PollFd::revents).is_some_and(|r| !r.is_empty());
            let first_listener =
                (if control { 3 } else { 2 }) + self.clients.len() + self.outgoing.len();
            if idle && fds[first_listener..].iter().any(|f| r(Some(f))) {
                events.push(Event::Traffic { busy: true });
            }
            (r(fds.first()), r(fds.get(1)), control && r(fds.get(2)))
        };
        if sig_ready {
            self.read_signals(&mut events);
        }
        if notify_ready {
            self.read_notify(&mut events);
        }
        if control_ready || !self.clients.is_empty() {
            self.serve_control(control_ready, &mut events);
        }
        if !self.outgoing.is_empty() {
            let now = Instant::now();
            self.outgoing.retain_mut(|o| !o.flush(now));
        }
        if self.accept_paused.is_some_and(|t| t <= Instant::now()) {
            self.accept_paused = None;
        }
        events.push(Event::Tick);
        Ok(events)
    }

    /// Pings systemd's watchdog, extends its reload timeout and samples the sockets' traffic
    /// when due.
    fn housekeeping(&mut self, events: &mut Vec<Event>) {
        let now = Instant::now();
        let sampling = self.state.cfg.exit_idle_after.is_some()
            && matches!(
                self.state.phase,
                state::Phase::Starting | state::Phase::Running
            );
        if !sampling {
            self.next_sample = None;
        } else if self.next_sample.is_none_or(|t| t <= now) {
            if let Some(w) = &mut self.watched {
                events.push(Event::Traffic {
                    busy: w.sample().busy(),
                });
            }
            // From the end of the sample: a slow sample (a host with many sockets) must not
            // make the next one due at once.
            self.next_sample = Some(Instant::now() + self.sample_every);
        }
        if let (Some(interval), Some(at)) = (self.watchdog, self.next_ping)
            && at <= now
        {
            self.execute(Action::Notify(vec![Upstream::Watchdog]));
            self.next_ping = Some(now + interval / 2);
        }
        match &self.state.reload {
            Some(r) => {
                // A rolling restart readies and drains one slot after the other.
                let steps = match r.kind {
                    state::ReloadKind::Surge => 1,
                    state::ReloadKind::Rolling { .. } => self.state.cfg.workers,
                };
                let cfg = &self.state.cfg;
                let per_step = cfg.ready_timeout + cfg.min_uptime + cfg.stop_timeout;
                let limit = r.started + per_step * steps;
                let due = self.next_extend.is_none_or(|t| t <= now);
                if due && now < limit {
                    self.execute(Action::Notify(vec![Upstream::ExtendTimeout(EXTEND_BY)]));
                    self.next_extend = Some(now + EXTEND_EVERY);
                } else if now >= limit {
                    self.next_extend = None;
                }
            }
            None => self.next_extend = None,
        }
    }

    /// The status snapshot for `clusterctl status` and SIGUSR1.
    fn report(&self) -> crate::status::Report {
        let sockets = self
            .listeners
            .names
            .iter()
            .cloned()
            .zip(self.listeners.addresses.iter().cloned())
            .collect();
        crate::status::report(&self.state, sockets, self.started, Instant::now())
    }

    /// Accepts new control clients and serves those whose request line is complete;
    /// clients past their deadline get an error answer. Never blocks on a client.
    fn serve_control(&mut self, accept: bool, events: &mut Vec<Event>) {
        if accept {
            for (stream, r) in self.accept_clients() {
                match r {
                    Ok(request) => self.handle_request(stream, request, events),
                    Err(e) => self.reply(stream, Err(e)),
                }
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.clients.len() {
            let done = match self.clients[i].read_request() {
                Some(r) => Some(r),
                None if self.clients[i].deadline <= now => Some(Err(format!(
                    "no complete request within {:?}",
                    crate::control::REQUEST_TIMEOUT
                ))),
                None => None,
            };
            match done {
                Some(r) => {
                    let stream = self.clients.swap_remove(i).into_stream();
                    match r {
                        Ok(request) => self.handle_request(stream, request, events),
                        Err(e) => self.reply(stream, Err(e)),
                    }
                }
                None => i += 1,
            }
        }
    }

    /// Accepts every waiting client; returns those whose request had already arrived (most
    /// clients send it right after connecting), to be served at once. At most
    /// `max_clients` stay pending: the oldest (silent) one is closed to make room. Out of
    /// fds (EMFILE), the oldest pending client is closed and accept retried; with none to
    /// close, the listener is not polled for a moment: never a busy loop.
    fn accept_clients(
        &mut self,
    ) -> Vec<(
        std::os::unix::net::UnixStream,
        std::result::Result<Request, String>,
    )> {
        const PAUSE: Duration = Duration::from_millis(250);
        let mut ready = Vec::new();
        let Some(control) = &self.control else {
            return ready;
        };
        // Bounded per wake-up, so that a client flood cannot keep the loop here.
        for _ in 0..1024 {
            match control.accept() {
                Ok(None) => break,
                Ok(Some(mut c)) => {
                    if let Some(r) = c.read_request() {
                        ready.push((c.into_stream(), r));
                    } else {
                        if self.clients.len() >= self.max_clients {
                            self.clients.remove(0);
                        }
                        self.clients.push(c);
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EMFILE | nix::libc::ENFILE)
                    ) && !self.clients.is_empty() =>
                {
                    self.clients.remove(0);
                }
                Err(e) => {
                    self.complaints.complain(format_args!(
                        "control socket: cannot accept a client ({e}); pausing for {PAUSE:?}"
                    ));
                    self.accept_paused = Some(Instant::now() + PAUSE);
                    break;
                }
            }
        }
        ready
    }

    /// Answers a control client (without blocking; see `control::answer`).
    fn reply(
        &mut self,
        stream: std::os::unix::net::UnixStream,
        result: std::result::Result<String, String>,
    ) {
        if let Some(o) = crate::control::answer(stream, result) {
            if self.outgoing.len() >= self.max_clients {
                self.outgoing.remove(0);
            }
            self.outgoing.push(o);
        }
    }

    fn handle_request(
        &mut self,
        stream: std::os::unix::net::UnixStream,
        request: Request,
        events: &mut Vec<Event>,
    ) {
        match request {
            Request::Status { json } => {
                let report = self.report();
                let text = if json {
                    report.json()
                } else {
                    format!("\n{}", report.text())
                };
                self.reply(stream, Ok(text));
            }
            // The client gets the state machine's own answer (`Action::Answer` or
            // `ReloadFinished`), never one guessed before the transition ran.
            Request::Scale(n) => {
                let ticket = self.ticket_for(stream);
                events.push(Event::Scale {
                    workers: n,
                    ticket: Some(ticket),
                });
            }
            Request::Upgrade { wait, binary } => {
                if self.upgrade.is_some() {
                    self.reply(stream, Err("an upgrade is already under way".into()));
                } else {
                    self.upgrade = Some(upgrade::Request::new(stream, wait, binary));
                }
            }
            Request::Reload { rolling, wait } => {
                let ticket = Some(self.ticket_for(stream));
                let rolling = rolling || self.rolling;
                events.push(if rolling {
                    Event::RollingRestart { ticket, wait }
                } else {
                    Event::Reload { ticket, wait }
                });
            }
        }
    }

    /// Keeps a control client until the state machine answers it.
    fn ticket_for(&mut self, stream: std::os::unix::net::UnixStream) -> event::Ticket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push((ticket, stream));
        ticket
    }

    fn read_signals(&mut self, events: &mut Vec<Event>) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(sig) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
                continue;
            };
            match sig {
                Signal::SIGCHLD => self.child_exited = true,
                Signal::SIGTERM | Signal::SIGINT => {
                    tracing::info!("received {}", sig.as_str());
                    events.push(Event::Stop);
                }
                Signal::SIGHUP => {
                    tracing::info!("received SIGHUP: reloading");
                    events.push(if self.rolling {
                        Event::RollingRestart {
                            ticket: None,
                            wait: false,
                        }
                    } else {
                        Event::Reload {
                            ticket: None,
                            wait: false,
                        }
                    });
                }
                Signal::SIGUSR1 => {
                    for line in self.report().text().lines() {
                        tracing::info!("stats: {line}");
                    }
                }
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    let n = self.state.cfg.workers;
                    let workers = if sig == Signal::SIGTTIN {
                        n + 1
                    } else {
                        n.saturating_sub(1)
                    };
                    tracing::info!("received {}: scaling to {workers} workers", sig.as_str());
                    events.push(Event::Scale {
                        workers,
                        ticket: None,
                    });
                }
                Signal::SIGUSR2 => {
                    tracing::info!("received SIGUSR2: rolling restart");
                    events.push(Event::RollingRestart {
                        ticket: None,
                        wait: false,
                    });
                }
                _ => {}
            }
        }
    }

    /// Reaps every exited child. A worker's process group is SIGKILLed while the worker is
    /// still a zombie (its pid, and so its group id, cannot be reused yet), so nothing it
    /// started outlives it.
    ///
    /// Each exit is handled right after its reap, before the next reap and before any
    /// other event of the batch: a pid is never signalled after it was reaped (only then
    /// could the kernel reuse it), because the state machine has forgotten it by then.
    fn reap(&mut self) {
        while self.exit.is_none() {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            let pid = match waitid(Id::All, flags) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => match s.pid() {
                    Some(p) => p,
                    None => return,
                },
            };
            if self.state.worker(pid).is_some() {
                let _ = killpg(pid, Signal::SIGKILL);
                if let Some(g) = &mut self.guardian {
                    g.track(pid, false);
                }
            }
            if self.guardian.as_ref().is_some_and(|g| g.pid() == pid) {
                tracing::warn!(
                    "the guardian process (pid {pid}) is gone: if the supervisor is SIGKILLed, \
                     processes started by workers may outlive it"
                );
                self.guardian = None;
            }
            let how = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => ExitKind::Code(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => ExitKind::Signal(sig as i32),
                _ => continue,
            };
            self.dispatch(Event::Exited { pid, how });
        }
    }

    fn read_notify(&mut self, events: &mut Vec<Event>) {
        loop {
            let dg = match self.notify.recv() {
                Ok(Some(dg)) => dg,
                Ok(None) => return,
                Err(e) => {
                    self.complaints.complain(format_args!("notify socket: {e}"));
                    return;
                }
            };
            let Some(sender) = dg.pid else {
                self.complaints.complain(format_args!(
                    "ignoring a notify datagram without credentials"
                ));
                continue;
            };
            let Some(pid) = self.attribute(sender) else {
                self.complaints.complain(format_args!(
                    "ignoring a notify datagram from pid {sender}, which is not a worker"
                ));
                continue;
            };
            match dg.msg {
                Ok(msg) => events.push(Event::Notify { pid, msg }),
                Err(why) => self.complaints.complain(format_args!(
                    "ignoring a notify datagram from worker pid {pid}: {why}"
                )),
            }
        }
    }

    /// The worker a notify sender belongs to: the worker itself, or one of its descendants
    /// (such as `systemd-notify --ready` run by a worker's shell script), found through
    /// the parent chain in `/proc/PID/stat`. Sharing a worker's process group is not
    /// enough: any process of the same user can join it.
    fn attribute(&self, sender: Pid) -> Option<Pid> {
        let mut pid = sender;
        for _ in 0..64 {
            if self.state.worker(pid).is_some() {
                return Some(pid);
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let parent = parse_ppid(&stat)?;
            if parent.as_raw() <= 1 || parent == Pid::this() || parent == pid {
                return None;
            }
            pid = parent;
        }
        None
    }

    /// Handles an event and carries out its actions. A spawn's outcome is handled after
    /// the rest of its batch (so that batch's notifications, e.g. `RELOADING=1`, go out
    /// first) but before any other event.
    ///
    /// All workers of one batch are forked first and their exec outcomes collected after,
    /// so their execs overlap (measured 1.5× faster for 256 workers).
    fn dispatch(&mut self, event: Event) {
        let mut queue = std::collections::VecDeque::from([event]);
        while let Some(e) = queue.pop_front() {
            let mut started = Vec::new();
            let mut results = Vec::new();
            for a in handle(&mut self.state, e, Instant::now()) {
                match self.execute(a) {
                    Some(Outcome::Started(slot, generation, s)) => {
                        started.push((slot, generation, s));
                    }
                    Some(Outcome::Event(e)) => results.push(e),
                    None => {}
                }
            }
            for (slot, generation, s) in started {
                let pid = s.as_ref().ok().map(sys::Started::pid);
                let result = s.and_then(sys::spawn_finish);
                if let (Some(pid), Err(_), Some(g)) = (pid, &result, &mut self.guardian) {
                    g.track(pid, false);
                }
                queue.push_back(self.spawn_outcome(slot, generation, result));
            }
            queue.extend(results);
        }
    }

    /// Carries out one action. A spawn only forks: it returns the started worker, whose
    /// exec outcome the caller collects (`dispatch` does so after the whole batch); a
    /// probe returns its result as an event.
    fn execute(&mut self, action: Action) -> Option<Outcome> {
        match action {
            Action::Spawn { slot, generation } => {
                let started = self.spawn_start(slot, generation);
                return Some(Outcome::Started(slot, generation, started));
            }
            Action::ProbeAccepting => {
                let found = match self.accept_watch.accept_queue() {
                    Ok((waiting, accepting)) => {
                        let stuck = waiting.intersection(&self.unaccepted).count();
                        let b = event::Backlog {
                            waiting: u32::try_from(waiting.len()).unwrap_or(u32::MAX),
                            stuck: u32::try_from(stuck).unwrap_or(u32::MAX),
                            accepting,
                        };
                        self.unaccepted = waiting;
                        Some(b)
                    }
                    Err(e) => {
                        tracing::debug!("cannot look at the accept queues: {e}");
                        None
                    }
                };
                return Some(Outcome::Event(Event::Backlog(found)));
            }
            Action::SampleMemory => {
                let samples = self
                    .state
                    .workers
                    .iter()
                    .filter(|w| {
                        matches!(
                            w.phase,
                            state::WorkerPhase::Starting { .. } | state::WorkerPhase::Ready { .. }
                        )
                    })
                    .filter_map(|w| memory::tree_rss(w.pid.as_raw()).map(|b| (w.pid, b)))
                    .collect();
                return Some(Outcome::Event(Event::Memory(samples)));
            }
            Action::Answer { ticket, result } => {
                if let Some(i) = self.waiting.iter().position(|(w, _)| *w == ticket) {
                    let (_, stream) = self.waiting.swap_remove(i);
                    self.reply(stream, result);
                }
            }
            Action::Kill { pid, signal, group } => {
                let r = if group {
                    killpg(pid, signal)
                } else {
                    kill(pid, signal)
                };
                if let Err(e) = r
                    && e != nix::Error::ESRCH
                {
                    tracing::warn!("cannot send {} to {pid}: {e}", signal.as_str());
                }
            }
            Action::Notify(msgs) => {
                if let Err(e) = notify::send_upstream(&msgs)
                    && !self.upstream_failed
                {
                    tracing::warn!("cannot notify the service manager: {e}");
                    self.upstream_failed = true;
                }
            }
            Action::Log {
                level,
                worker,
                message,
            } => crate::log::event(level, worker, &message),
            Action::ReloadFinished { tickets, result } => {
                for t in tickets {
                    if let Some(i) = self.waiting.iter().position(|(w, _)| *w == t) {
                        let (_, stream) = self.waiting.swap_remove(i);
                        let answer = result.clone().map(|g| format!("generation {g} serving"));
                        self.reply(stream, answer);
                    }
                }
            }
            Action::Exit { code } => {
                if code == 0 {
                    tracing::info!("all workers stopped; exiting");
                }
                self.exit = Some(code);
            }
        }
        None
    }

    /// Forks the worker for `slot` of `generation` (see `sys::spawn_start`).
    fn spawn_start(&mut self, slot: u32, generation: u32) -> std::io::Result<sys::Started> {
        let mut env = self.base_env.clone();
        env.push(("WORKER_ID".into(), slot.to_string().into()));
        env.push(("CLUSTER_GENERATION".into(), generation.to_string().into()));
        env.push((
            "CLUSTER_WORKERS".into(),
            self.state.cfg.workers.to_string().into(),
        ));
        let pid_keys: &[&str] = if self.state.cfg.worker_watchdog.is_some() {
            &["LISTEN_PID", "WATCHDOG_PID"]
        } else {
            &["LISTEN_PID"]
        };
        let output = self
            .journal_identifier
            .as_deref()
            .and_then(|id| crate::journal::stream_for(id, slot));
        // Journal-aware programs check JOURNAL_STREAM against their stderr: it names the
        // worker's own stream, or (inheriting ours) stays as it is.
        if let Some(id) = output.as_ref().and_then(crate::journal::stream_id) {
            env.retain(|(k, _)| k != "JOURNAL_STREAM");
            env.push(("JOURNAL_STREAM".into(), id.into()));
        }
        let plan = sys::ExecPlan::new(
            &self.program,
            &self.argv,
            &env,
            pid_keys,
            self.listeners.len(),
            &self.devnull,
            output.as_ref(),
        );
        let started = plan.and_then(|mut p| sys::spawn_start(&mut p));
        if let (Ok(s), Some(g)) = (&started, &mut self.guardian) {
            g.track(s.pid(), true);
            if g.broken {
                g.broken = false;
                self.complaints.complain(format_args!(
                    "cannot reach the guardian process (pid {}): workers' children may \
                     outlive a SIGKILLed supervisor",
                    g.pid()
                ));
            }
        }
        started
    }

    /// The event for a spawn's outcome.
    fn spawn_outcome(&self, slot: u32, generation: u32, result: std::io::Result<Pid>) -> Event {
        match result {
            Ok(pid) => Event::Spawned {
                slot,
                generation,
                pid,
            },
            Err(e) => {
                let permanent = matches!(
                    e.raw_os_error(),
                    Some(
                        nix::libc::ENOENT
                            | nix::libc::EACCES
                            | nix::libc::ENOEXEC
                            | nix::libc::ENOTDIR
                    )
                );
                Event::SpawnFailed {
                    slot,
                    generation,
                    error: format!("{}: {e}", self.program.display()),
                    permanent,
                }
            }
        }
    }
}

/// What an action leaves for `dispatch` to finish.
enum Outcome {
    /// A forked worker whose exec outcome is still to be collected.
    Started(u32, u32, std::io::Result<sys::Started>),
    /// An event to handle next (a probe's result).
    Event(Event),
}

/// systemd's watchdog interval for us (`WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or ours).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The parent pid from the contents of `/proc/PID/stat`.
fn parse_ppid(stat: &str) -> Option<Pid> {
    // "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
    Some(Pid::from_raw(ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_from_proc_stat() {
        assert_eq!(
            parse_ppid("1234 (my (odd) prog) S 77 1200 1200 0 -1"),
            Some(Pid::from_raw(77))
        );
        assert_eq!(parse_ppid("garbage"), None);
    }

    #[test]
    fn command_resolution() {
        assert!(resolve_command(&"sh".into()).unwrap().is_absolute());
        let e = resolve_command(&"no-such-command-xyz".into()).unwrap_err();
        assert!(e.to_string().contains("no-such-command-xyz"));
        assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
        let dir = std::env::temp_dir().join(format!("clusterctl-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-executable");
        std::fs::write(&file, "data").unwrap();
        let e = resolve_command(&file.clone().into()).unwrap_err();
        assert!(e.to_string().contains("Permission denied"), "{e}");
        let e = resolve_command(&dir.clone().into()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let e = resolve_command(&"/nonexistent/x".into()).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
