//! Decoding what woke the executor into `Event`s: signals (signalfd), exits (reaped with
//! waitid/waitpid, one at a time, each handled before the next), notify datagrams
//! (attributed to a worker through the parent chain in `/proc`).

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use super::event::{Event, ExitKind};
use super::{Executor, procfs};

impl Executor {
    pub(super) fn read_signals(&mut self, events: &mut Vec<Event>) {
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
    pub(super) fn reap(&mut self) {
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

    pub(super) fn read_notify(&mut self, events: &mut Vec<Event>) {
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
    pub(super) fn attribute(&self, sender: Pid) -> Option<Pid> {
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
}
