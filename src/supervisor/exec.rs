//! Starting a worker, for the executor: its environment (WORKER_ID, CLUSTER_GENERATION,
//! LISTEN_*, a journal stream of its own), the fork (`sys::spawn_start`), its pidfd, and
//! the event for the outcome.

use nix::unistd::Pid;

use super::Executor;
use super::event::Event;
use crate::sys;

impl Executor {
    /// Forks the worker for `slot` of `generation` (see `sys::spawn_start`).
    pub(super) fn spawn_start(
        &mut self,
        slot: u32,
        generation: u32,
    ) -> std::io::Result<sys::Started> {
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
    pub(super) fn open_pidfd(&mut self, pid: Pid) {
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
    pub(super) fn spawn_outcome(
        &self,
        slot: u32,
        generation: u32,
        result: std::io::Result<Pid>,
    ) -> Event {
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
