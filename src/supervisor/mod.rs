//! `clusterctl run`: the executor around the pure state machine.
//!
//! One thread, one `poll(2)` over a signalfd (SIGCHLD, SIGTERM, SIGHUP, …), the workers'
//! notify socket, the control socket and its clients, and each worker's pidfd, with a
//! timeout only when the state machine has a deadline armed (`State::next_deadline`): when
//! nothing is going on, the supervisor never wakes up. The executor holds no policy: it
//! waits (`wait`, a poll set keyed by `Token`), decodes what woke it into `Event`s
//! (decode.rs, clients.rs), feeds them to `handle()` and carries out the `Action`s
//! (`execute`; spawning in exec.rs, measurements in samples.rs). Every schedule — ready timeouts, backoff, systemd's
//! watchdog and reload timeout, traffic and memory samples — is a deadline in `State`,
//! fired by `Event::Tick`; every control verb is an `Event` with a `Ticket`, answered by an
//! `Action`.
//!
//! ```text
//! start.rs     options -> state::Config, sockets, guardian, control socket, signalfd
//! mod.rs       the loop: wait, dispatch, execute
//! decode.rs    signals, reaping (waitid), notify datagrams -> Event
//! clients.rs   control clients -> Event + Ticket; answers written back
//! exec.rs      Action::Spawn: environment, fork/exec, pidfd
//! samples.rs   Action::ProbeAccepting / SampleMemory -> Event
//! event.rs     Event / Action: the vocabulary
//! state.rs     State, Worker, WorkerPhase, StopReason, Reload: plain data
//! handle.rs    handle(state, event, now) -> actions; handle/{lifecycle,reload,scale,tick}.rs
//! procfs.rs    the one /proc reader; memory.rs: tree RSS; pidfile.rs; status.rs: the report
//! handover.rs  `clusterctl upgrade`: the versioned snapshot of State and fds
//! upgrade.rs   Action::Upgrade: the exec after the batch; in the new image, resuming
//! ```

mod clients;
mod decode;
pub mod event;
mod exec;
mod handle;
pub mod handover;
mod memory;
mod pidfile;
pub(crate) mod procfs;
mod samples;
mod start;
pub mod state;
mod status;
mod upgrade;

pub use self::start::run;

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{kill, killpg};
use nix::sys::signalfd::SignalFd;
use nix::unistd::Pid;

use self::event::{Action, Event};
pub use self::handle::handle;
use self::state::State;
use crate::control::ControlSocket;
use crate::error::{Context, Result};
use crate::notify::{self, Complaints, NotifySocket};
use crate::sockets::Listeners;
use crate::sys;

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
    /// `clusterctl upgrade`: a request to carry out after the current batch, and (in the
    /// new image) what is left to do on resume.
    upgrade: Option<upgrade::Request>,
    resumed: Option<upgrade::Resumed>,
}

impl Executor {
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
            Action::ProbeAccepting => return Some(Outcome::Event(self.probe_accepting())),
            Action::SampleMemory => return Some(Outcome::Event(self.sample_memory())),
            Action::SampleTraffic => {
                let busy = self.watched.as_mut().is_some_and(|w| w.sample().busy());
                return Some(Outcome::Event(Event::Traffic { busy }));
            }
            Action::Report { ticket, json } => self.report_status(ticket, json),
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
            Action::Upgrade {
                ticket,
                wait,
                binary,
            } => self.ask_upgrade(ticket, wait, binary),
            Action::Exit { code } => {
                if code == 0 {
                    tracing::info!("all workers stopped; exiting");
                }
                self.exit = Some(code);
            }
        }
        None
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
