//! The executor's side of `clusterctl upgrade` (the format is in `handover.rs`): write the
//! snapshot, keep exactly the fds to hand over, `execve` in the same pid; and in the new
//! image, adopt those fds and the state, reap what exited meanwhile, tell systemd we live.
//!
//! The request is an `Event::Upgrade` with a ticket; `handle()` refuses it while stopping
//! or answers `Action::Upgrade`, which `ask_upgrade` records; `upgrade` runs it.
//!
//! The upgrade runs between two batches of events (never in the middle of one, so nothing
//! read from the notify socket or the signalfd is dropped): exits during the exec stay
//! zombies and blocked signals stay pending (the mask survives `execve`), notifications
//! wait in the notify socket, control clients in the listener's backlog.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::Executor;
use super::event::{Event, Ticket};
use super::handover::{self, Base, Clock, Snapshot};
use super::state::Phase;
use crate::control::ControlSocket;
use crate::error::{Error, Result};
use crate::notify::NotifySocket;
use crate::sockets::Listeners;
use crate::sys;

/// An `upgrade` request (`Action::Upgrade`) waiting for the end of the current batch; its
/// client waits under `ticket`.
#[derive(Debug)]
pub struct Request {
    pub ticket: Ticket,
    pub wait: bool,
    pub binary: Option<PathBuf>,
    /// When it was accepted (monotonic µs), for the "resumed in" figure.
    pub requested: u64,
}

/// The upgrade being carried out, with its client's connection.
struct UpgradeCall {
    stream: UnixStream,
    wait: bool,
    binary: Option<PathBuf>,
    requested: u64,
}

/// What the new image took over, until `Executor::resumed` runs.
#[derive(Debug)]
pub struct Resume {
    snapshot: Snapshot,
    pub listeners: Option<Listeners>,
    pub notify: Option<NotifySocket>,
    pub control: Option<ControlSocket>,
    pub guardian: Option<sys::Guardian>,
    client: Option<OwnedFd>,
    waiting: Vec<(u64, OwnedFd)>,
}

/// Left for the first loop iteration of the new image.
#[derive(Debug)]
pub struct Resumed {
    client: Option<UnixStream>,
    from_version: String,
    /// The snapshot's hand-over format.
    format: u32,
    requested: u64,
    /// Why only the base section could be used, if so.
    fallback: Option<String>,
}

impl Resume {
    /// Reads and adopts everything the previous image handed over at `fd`.
    pub fn read(fd: RawFd) -> Result<Resume> {
        let fail = |e: String| {
            Error::Failed(format!(
                "cannot resume after `clusterctl upgrade`: {e}. The workers are left to the \
                 service manager; start the service again"
            ))
        };
        let text = handover::read_fd(fd).map_err(fail)?;
        let snapshot = handover::decode(&text).map_err(fail)?;
        let b = &snapshot.base;
        let adopt = |fd: RawFd| sys::adopt_fd(fd).map_err(|e| fail(e.to_string()));
        for i in 0..b.listeners.len() {
            // At 3..3+n since the first image; close-on-exec again, as before the upgrade.
            sys::set_inherit(3 + RawFd::try_from(i).unwrap_or(0), false)
                .map_err(|e| fail(format!("listening socket {i}: {e}")))?;
        }
        let listeners = Listeners::adopt(
            b.listeners.iter().map(|l| l.0.clone()).collect(),
            b.listeners.iter().map(|l| l.1.clone()).collect(),
            b.created_paths.clone(),
        );
        let notify =
            NotifySocket::adopt(adopt(b.notify.0)?, b.notify.1.clone(), b.notify.2.clone());
        let control = match &b.control {
            Some((fd, path, id)) => Some(ControlSocket::adopt(adopt(*fd)?, path.clone(), *id)),
            None => None,
        };
        let guardian = match b.guardian {
            Some((fd, pid)) => Some(sys::Guardian::adopt(Pid::from_raw(pid), adopt(fd)?)),
            None => None,
        };
        let client = b.client.map(adopt).transpose()?;
        let waiting = b
            .waiting
            .iter()
            .map(|(t, fd)| adopt(*fd).map(|f| (*t, f)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Resume {
            snapshot,
            listeners: Some(listeners),
            notify: Some(notify),
            control,
            guardian,
            client,
            waiting,
        })
    }

    /// Puts the handed-over state into the new executor.
    pub fn apply(self, sup: &mut Executor) {
        let clock = Clock::now();
        let base = &self.snapshot.base;
        // `--workers` and the rest of the command line are the same (same argv); the pool's
        // size as `scale` left it comes with the slots.
        let cfg = sup.state.cfg.clone();
        let full = self
            .snapshot
            .full
            .clone()
            .and_then(|text| handover::decode_full(&text, cfg.clone(), clock));
        let (state, fallback) = match full {
            Ok(state) => (state, None),
            Err(why) => (
                handover::state_from_base(base, cfg, Instant::now()),
                Some(why),
            ),
        };
        sup.state = state;
        // systemd's watchdog: pinged by the first tick (the old image's schedule is not
        // trusted across an exec of unknown length).
        sup.state.watchdog_ping_at = sup.state.cfg.systemd_watchdog.map(|_| Instant::now());
        sup.next_ticket = base.next_ticket;
        sup.started = clock.instant(base.started);
        for (ticket, fd) in self.waiting {
            let stream = UnixStream::from(fd);
            if fallback.is_some() {
                sup.reply(
                    stream,
                    Err(
                        "clusterctl was upgraded meanwhile to a binary that could not read the \
                         reload's state; its outcome is unknown (see `clusterctl status`)"
                            .into(),
                    ),
                );
            } else {
                sup.waiting.push((ticket, stream));
            }
        }
        sup.resumed = Some(Resumed {
            client: self.client.map(UnixStream::from),
            from_version: base.from_version.clone(),
            format: self.snapshot.version,
            requested: base.requested,
            fallback,
        });
    }
}

impl Executor {
    /// `Action::Upgrade`: the exec waits for the end of the batch (`Executor::run`).
    pub(super) fn ask_upgrade(&mut self, ticket: Ticket, wait: bool, binary: Option<PathBuf>) {
        if self.upgrade.is_some() {
            return self.answer(ticket, Err("an upgrade is already under way".into()));
        }
        self.upgrade = Some(Request {
            ticket,
            wait,
            binary,
            requested: handover::monotonic_usec(),
        });
    }

    /// Carries out an `upgrade` request: only returns if the exec failed or was refused
    /// (the client got the reason, everything goes on as before).
    pub(super) fn upgrade(&mut self, ask: Request) {
        // The client is answered here or by the new image, not through `waiting`.
        let Some(i) = self.waiting.iter().position(|(t, _)| *t == ask.ticket) else {
            return;
        };
        let (_, stream) = self.waiting.swap_remove(i);
        let req = UpgradeCall {
            stream,
            wait: ask.wait,
            binary: ask.binary,
            requested: ask.requested,
        };
        let refuse = |sup: &mut Executor, stream, why: String| {
            tracing::warn!("upgrade refused: {why}");
            sup.reply(stream, Err(why));
        };
        if matches!(self.state.phase, Phase::Stopping { .. }) {
            return refuse(self, req.stream, "the supervisor is stopping".into());
        }
        let checked = handover::target_binary(req.binary.as_deref())
            .and_then(|b| handover::preflight(&b).map(|()| b));
        let binary = match checked {
            Ok(b) => b,
            Err(e) => {
                return refuse(
                    self,
                    req.stream,
                    format!(
                        "{e}; the supervisor keeps running (clusterctl {})",
                        handover::version()
                    ),
                );
            }
        };
        let clock = Clock::now();
        let from_binary = handover::current_binary().unwrap_or_default();
        let client_fd = req.wait.then(|| req.stream.as_raw_fd());
        let n = self.listeners.len();
        let base = Base {
            from_binary: from_binary.clone(),
            from_version: handover::version(),
            written: handover::monotonic_usec(),
            requested: req.requested,
            started: clock.usec(self.started),
            notify: (
                self.notify.as_fd().as_raw_fd(),
                self.notify.path().to_path_buf(),
                self.notify.tmpdir().map(std::path::Path::to_path_buf),
            ),
            control: self
                .control
                .as_ref()
                .map(|c| (c.as_fd().as_raw_fd(), c.path().to_path_buf(), c.file_id())),
            guardian: self
                .guardian
                .as_ref()
                .map(|g| (g.pipe_fd(), g.pid().as_raw())),
            listeners: self
                .listeners
                .names
                .iter()
                .cloned()
                .zip(self.listeners.addresses.iter().cloned())
                .collect(),
            created_paths: self.listeners.created_paths().to_vec(),
            workers_wanted: self.state.desired(),
            workers: self
                .state
                .workers
                .iter()
                .map(|w| (w.slot, w.generation, w.pid.as_raw()))
                .collect(),
            waiting: self
                .waiting
                .iter()
                .map(|(t, s)| (*t, s.as_raw_fd()))
                .collect(),
            client: client_fd,
            next_ticket: self.next_ticket,
        };
        let text = handover::encode(&base, &self.state, clock);
        let memfd = match handover::to_memfd(&text) {
            Ok(f) => f,
            Err(e) => {
                return refuse(
                    self,
                    req.stream,
                    format!("cannot write the hand-over state: {e}"),
                );
            }
        };
        let argv: Vec<_> = std::env::args_os().collect();
        let argv = match handover::resume_argv(&argv, memfd.as_raw_fd()) {
            Ok(a) => a,
            Err(e) => return refuse(self, req.stream, e),
        };
        let mut keep: Vec<RawFd> = (0..n)
            .map(|i| 3 + RawFd::try_from(i).unwrap_or(0))
            .collect();
        keep.push(memfd.as_raw_fd());
        keep.push(base.notify.0);
        keep.extend(base.control.as_ref().map(|c| c.0));
        keep.extend(base.guardian.map(|g| g.0));
        keep.extend(client_fd);
        keep.extend(base.waiting.iter().map(|w| w.1));
        let mut client = Some(req.stream);
        if !req.wait
            && let Some(stream) = client.take()
        {
            self.reply(
                stream,
                Ok(format!(
                    "upgrading: executing {} in pid {} ({} workers keep running)",
                    binary.display(),
                    std::process::id(),
                    self.state.workers.len()
                )),
            );
        }
        tracing::info!(
            "upgrade: executing {} in pid {} ({} bytes of state, {} workers keep running)",
            binary.display(),
            std::process::id(),
            text.len(),
            self.state.workers.len()
        );
        // execve ends the journald log thread: what it has queued is written first.
        if !crate::log::flush(Duration::from_secs(1)) {
            crate::log::DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let kept: Vec<RawFd> = keep
            .iter()
            .copied()
            .filter(|fd| sys::set_inherit(*fd, true).is_ok())
            .collect();
        let err = if kept.len() == keep.len() {
            sys::exec(&binary, &argv)
        } else {
            std::io::Error::other("cannot clear FD_CLOEXEC on the fds to hand over")
        };
        for fd in kept {
            let _ = sys::set_inherit(fd, false);
        }
        drop(memfd);
        let why = format!(
            "cannot execute {}: {err}; the supervisor keeps running (clusterctl {})",
            binary.display(),
            handover::version()
        );
        tracing::error!("upgrade failed: {why}");
        if let Some(stream) = client {
            self.reply(stream, Err(why));
        }
    }

    /// The new image's first step: reap what exited during the exec, tell systemd
    /// (`WATCHDOG=1`, `STATUS=`), answer the `upgrade --wait` client.
    pub(super) fn resumed(&mut self, r: Resumed) {
        let took = Duration::from_micros(handover::monotonic_usec().saturating_sub(r.requested));
        if let Some(why) = &r.fallback {
            tracing::warn!(
                "resumed from the base hand-over state only ({why}): workers are kept and \
                 taken as ready; timers, counters and backoff start afresh"
            );
        }
        tracing::info!(
            "upgrade: resumed as clusterctl {} (was {}, hand-over format {}) in {}ms, pid {} \
             unchanged, {} workers kept",
            handover::version(),
            r.from_version,
            r.format,
            took.as_millis(),
            std::process::id(),
            self.state.workers.len()
        );
        self.reap();
        // pidfds do not survive the exec (they are close-on-exec like every other fd we
        // do not hand over): each worker left is still our unreaped child, so its pid
        // cannot have been reused and `pidfd_open` gets the same process.
        let pids: Vec<Pid> = self.state.workers.iter().map(|w| w.pid).collect();
        for pid in pids {
            if sys::is_child(pid) {
                self.open_pidfd(pid);
            }
        }
        // A worker reaped by something else that ran in this pid (a wrapper script given
        // as --binary) is gone without an exit status for us: it is handled as lost.
        let vanished: Vec<Pid> = self
            .state
            .workers
            .iter()
            .map(|w| w.pid)
            .filter(|p| !sys::is_child(*p))
            .collect();
        for pid in vanished {
            tracing::warn!(
                "worker pid {pid} was reaped during the upgrade by another program in this                  process (a wrapper given as --binary?): its exit status is unknown"
            );
            self.dispatch(Event::Exited {
                pid,
                how: super::event::ExitKind::Code(-1),
            });
        }
        // STATUS= is sent again from the state machine's own status line.
        self.state.last_status.clear();
        self.dispatch(Event::Tick);
        if let Some(client) = r.client {
            let binary = handover::current_binary().unwrap_or_default();
            let mut text = format!(
                "upgraded to clusterctl {} ({}) in {}ms; pid {} unchanged, {} workers kept",
                handover::version(),
                binary.display(),
                took.as_millis(),
                std::process::id(),
                self.state.workers.len()
            );
            if r.fallback.is_some() {
                text.push_str(" (from the base state only: see the log)");
            }
            self.reply(client, Ok(text));
        }
    }
}
