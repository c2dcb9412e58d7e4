//! `clusterctl run`: the executor around the pure state machine.
//!
//! One thread, one `poll(2)` over a signalfd (SIGCHLD, SIGTERM, SIGHUP, …) and the workers'
//! notify socket, with a timeout only when the state machine has a deadline armed: when
//! nothing is going on, the supervisor never wakes up. Each wake-up is decoded into
//! `Event`s, fed to `handle()`, and the returned `Action`s are carried out here.

mod command;
pub mod event;
mod handle;
mod memory;
mod pidfile;
pub(crate) mod procfs;
pub mod state;

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
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
use crate::notify::{self, Complaints, NotifySocket};
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
    let (listeners, warnings) = sockets::acquire(&args.listen, args.reuse_port)?;
    let nofile = sys::raise_nofile();
    // Forked from the main thread before the log thread exists; it keeps none of our fds.
    let guardian = sys::Guardian::start();
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
    let program = command::resolve_command(&args.command[0])?;
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
        systemd_watchdog: watchdog_interval(),
    };
    if cfg
        .worker_watchdog
        .is_some_and(|d| d < Duration::from_millis(10))
    {
        return Err(Error::config("--worker-watchdog must be at least 10ms"));
    }
    let pidfile = (args.pidfile.as_deref())
        .map(pidfile::Pidfile::create)
        .transpose()?;
    let control = match args.control.clone().or_else(ControlSocket::default_path) {
        Some(path) => Some(ControlSocket::bind(&path)?),
        // Run by hand: a control socket of its own, found by `clusterctl status`.
        None => match ControlSocket::bind_by_hand(&program) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("no control socket ({e}); give --control PATH to have one");
                None
            }
        },
    };
    let mut sup = Executor::new(cfg, listeners, program, args.command, control)?;
    sup.guardian = guardian;
    let code = sup.run();
    drop(pidfile);
    code
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
    /// Each worker's pidfd (`pidfd_open` after its spawn): signals go through it, and it
    /// wakes the poll when the worker exits. Empty on kernels without pidfds.
    pidfds: std::collections::HashMap<Pid, OwnedFd>,
    /// `pidfd_open` is missing (ENOSYS, Linux < 5.3): plain pids, warned once.
    no_pidfds: bool,
}

impl Executor {
    fn new(
        cfg: Config,
        listeners: Listeners,
        program: PathBuf,
        argv: Vec<OsString>,
        control: Option<ControlSocket>,
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
        let notify = NotifySocket::bind()?;
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
            "supervisor pid {} starting {} worker(s) of {} on {}",
            std::process::id(),
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
        })
    }

    fn run(&mut self) -> Result<u8> {
        self.dispatch(Event::Start);
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
        }
        Ok(self.exit.unwrap_or(0))
    }

    /// Sleeps until something happens or the next deadline; returns the events.
    fn wait(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let idle = self.state.phase == state::Phase::Idle && self.watched.is_some();
        let deadline = [
            self.state.next_deadline(),
            self.clients.iter().map(|c| c.deadline).min(),
            self.outgoing.iter().map(|c| c.deadline).min(),
            self.accept_paused,
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(t) => {
                let d = t.saturating_duration_since(Instant::now());
                // Round up, so we never wake a hair before the deadline and spin.
                let ms = d.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(PollTimeout::MAX)
            }
        };
        // The poll set, each fd with what it is.
        let paused = self.accept_paused.is_some_and(|t| t > Instant::now());
        let mut polled: Vec<(Token, PollFd)> = vec![
            (
                Token::Signals,
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ),
            (
                Token::Notify,
                PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
            ),
        ];
        if let Some(c) = self.control.as_ref().filter(|_| !paused) {
            polled.push((Token::Control, PollFd::new(c.as_fd(), PollFlags::POLLIN)));
        }
        // Control clients whose request is still arriving: served in serve_control.
        for c in &self.clients {
            polled.push((Token::Client, PollFd::new(c.as_fd(), PollFlags::POLLIN)));
        }
        // Answers that did not fit at once: finished when the client reads.
        for o in &self.outgoing {
            polled.push((Token::Outgoing, PollFd::new(o.as_fd(), PollFlags::POLLOUT)));
        }
        // A worker's pidfd turns readable when it exits.
        for fd in self.pidfds.values() {
            polled.push((Token::Worker, PollFd::new(fd.as_fd(), PollFlags::POLLIN)));
        }
        // Holding the sockets without workers: a connection makes a listener readable.
        if idle {
            for i in 0..self.listeners.len() {
                let fd = PollFd::new(sys::listen_fd(i), PollFlags::POLLIN);
                polled.push((Token::Listener, fd));
            }
        }
        let ready: Vec<Token> = {
            let mut fds: Vec<PollFd> = polled.iter().map(|(_, f)| f.clone()).collect();
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e).context(|| "poll failed".into()),
            }
            (polled.iter().zip(&fds))
                .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                .map(|((t, _), _)| *t)
                .collect()
        };
        let sig_ready = ready.contains(&Token::Signals);
        let notify_ready = ready.contains(&Token::Notify);
        let control_ready = ready.contains(&Token::Control);
        if ready.contains(&Token::Worker) {
            self.child_exited = true;
        }
        if ready.contains(&Token::Listener) {
            events.push(Event::Traffic { busy: true });
        }
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
                let ticket = Some(self.ticket_for(stream));
                events.push(Event::Status { ticket, json });
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
            Request::Reload { rolling, wait } => {
                let ticket = Some(self.ticket_for(stream));
                events.push(if rolling {
                    Event::RollingRestart { ticket, wait }
                } else {
                    Event::Reload { ticket, wait }
                });
            }
        }
    }

    /// Answers the control client holding `ticket` (gone already: nothing to do).
    fn answer(&mut self, ticket: event::Ticket, result: std::result::Result<String, String>) {
        if let Some(i) = self.waiting.iter().position(|(w, _)| *w == ticket) {
            let (_, stream) = self.waiting.swap_remove(i);
            self.reply(stream, result);
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
                    events.push(Event::Reload {
                        ticket: None,
                        wait: false,
                    });
                }
                Signal::SIGUSR1 => events.push(Event::Status {
                    ticket: None,
                    json: false,
                }),
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    tracing::info!("received {}", sig.as_str());
                    events.push(Event::ScaleStep {
                        up: sig == Signal::SIGTTIN,
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
            // Reaped below: from then on the pid may be reused, and the state machine
            // forgets it with this `Exited`.
            self.pidfds.remove(&pid);
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
            let parent = Pid::from_raw(procfs::stat(pid.as_raw())?.ppid);
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
                if let Ok(pid) = &result {
                    self.open_pidfd(*pid);
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
            Action::SampleTraffic => {
                let busy = self.watched.as_mut().is_some_and(|w| w.sample().busy());
                return Some(Outcome::Event(Event::Traffic { busy }));
            }
            Action::Report { ticket, json } => {
                let report = self.report();
                match ticket {
                    Some(ticket) => {
                        let text = if json {
                            report.json()
                        } else {
                            format!("\n{}", report.text())
                        };
                        self.answer(ticket, Ok(text));
                    }
                    None => {
                        for line in report.text().lines() {
                            tracing::info!("stats: {line}");
                        }
                    }
                }
            }
            Action::Answer { ticket, result } => self.answer(ticket, result),
            Action::Kill { pid, signal, group } => {
                // The group id is the worker's pid, not reusable while the worker is not
                // reaped (and the state machine forgets it once it is).
                let r = match self.pidfds.get(&pid) {
                    _ if group => killpg(pid, signal),
                    Some(fd) => sys::pidfd_send_signal(fd.as_fd(), signal)
                        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(0))),
                    None => kill(pid, signal),
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
                    self.answer(t, result.clone().map(|g| format!("generation {g} serving")));
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
            self.state.desired().to_string().into(),
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

    /// Holds a pidfd for a new worker (before anything can reap it: only this thread
    /// reaps, and not before its `Spawned` was handled).
    fn open_pidfd(&mut self, pid: Pid) {
        if self.no_pidfds {
            return;
        }
        match sys::pidfd_open(pid) {
            Ok(fd) => {
                self.pidfds.insert(pid, fd);
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => {
                self.no_pidfds = true;
                tracing::warn!(
                    "this kernel has no pidfd_open (Linux < 5.3): workers are signalled by pid"
                );
            }
            Err(e) => tracing::debug!("cannot open a pidfd for worker pid {pid}: {e}"),
        }
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

/// What a polled fd is (see `Executor::wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Signals,
    Notify,
    /// The control socket's listener.
    Control,
    /// A control client whose request is still arriving.
    Client,
    /// A control client whose answer is still being written.
    Outgoing,
    /// A worker's pidfd: readable once it exited.
    Worker,
    /// A held listening socket (`--lazy`, idle).
    Listener,
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
