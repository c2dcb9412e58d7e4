//! The vocabulary between the pure state machine (`handle.rs`) and the executor (`mod.rs`):
//! events come in (things that happened), actions go out (things to do).

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::Level;

use crate::notify::{NotifyMsg, Upstream};

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit code {c}"),
            ExitKind::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal {}", sig.as_str()),
                Err(_) => write!(f, "signal {s}"),
            },
        }
    }
}

/// A control request's identity, so its answer can be routed back (e.g. `reload --wait`).
pub type Ticket = u64;

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The supervisor starts: launch the first generation.
    Start,
    /// A `Spawn` action succeeded.
    Spawned {
        slot: u32,
        generation: u32,
        pid: Pid,
    },
    /// A `Spawn` action failed; `permanent` when retrying cannot help (command missing,
    /// not executable).
    SpawnFailed {
        slot: u32,
        generation: u32,
        error: String,
        permanent: bool,
    },
    /// A worker (the leader of its process group) ended.
    Exited { pid: Pid, how: ExitKind },
    /// A worker sent a notify datagram (already attributed to the worker's pid).
    Notify { pid: Pid, msg: NotifyMsg },
    /// SIGTERM / SIGINT: stop everything (a second one kills at once).
    Stop,
    /// SIGHUP or `clusterctl reload`: start a new generation (one slot at a time with
    /// `--reload-strategy rolling`). `ticket` identifies the control client to answer:
    /// with `wait`, once the reload finished (`ReloadFinished`); without, as soon as the
    /// request was accepted or refused (`Answer`).
    Reload { ticket: Option<Ticket>, wait: bool },
    /// SIGUSR2 or `clusterctl restart --rolling`: replace workers one slot at a time.
    RollingRestart { ticket: Option<Ticket>, wait: bool },
    /// A sample of the listening sockets (the answer to `Action::SampleTraffic`, or a
    /// connection on a held socket with `--lazy`): were connections queued or open?
    Traffic { busy: bool },
    /// `clusterctl scale N`, SIGTTIN (+1), SIGTTOU (-1): run this many workers from now on.
    /// The control client (`ticket`) gets the outcome as an `Answer`.
    Scale {
        workers: u32,
        ticket: Option<Ticket>,
    },
    /// SIGTTIN (`up`) / SIGTTOU: one worker more or fewer than the pool runs now.
    ScaleStep { up: bool },
    /// `clusterctl status` (`ticket`) or SIGUSR1 (no ticket: logged): answered with
    /// `Action::Report`.
    Status { ticket: Option<Ticket>, json: bool },
    /// The answer to `Action::ProbeAccepting`; `None` when the sockets cannot be seen
    /// (no TCP listener, no netlink).
    Backlog(Option<Backlog>),
    /// The answer to `Action::SampleMemory`: resident memory in bytes (the worker's whole
    /// process tree) of each worker that could be read.
    Memory(Vec<(Pid, u64)>),
    /// `clusterctl upgrade [--wait] [--binary PATH]` (`ticket`): answered with
    /// `Action::Upgrade` (the executor re-executes) or a refusal (`Answer`).
    Upgrade {
        ticket: Ticket,
        wait: bool,
        binary: Option<std::path::PathBuf>,
    },
    /// Some armed deadline may have passed (the executor wakes us at `next_deadline`).
    Tick,
}

/// Something to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker in `slot` for `generation`; the result comes back as `Spawned` or
    /// `SpawnFailed` before any other event is handled.
    Spawn { slot: u32, generation: u32 },
    /// Send `signal` to the worker, or to its whole process group.
    Kill {
        pid: Pid,
        signal: Signal,
        group: bool,
    },
    /// One datagram to systemd.
    Notify(Vec<Upstream>),
    Log {
        level: Level,
        worker: Option<WorkerTag>,
        message: String,
    },
    /// A reload (or rolling restart) ended; answer these waiting clients.
    ReloadFinished {
        tickets: Vec<Ticket>,
        result: Result<u32, String>,
    },
    /// The outcome of a control request that does not wait for a reload.
    Answer {
        ticket: Ticket,
        result: Result<String, String>,
    },
    /// Answer a status request (or, without a ticket, log the report): the executor adds
    /// what only it can see (sockets, `/proc`).
    Report { ticket: Option<Ticket>, json: bool },
    /// Sample the listening sockets' traffic; the result comes back as `Traffic`.
    SampleTraffic,
    /// Look at the listening sockets' accept queues; the result comes back as `Backlog`.
    ProbeAccepting,
    /// Read the resident memory of the starting and ready workers; the result comes back
    /// as `Memory`.
    SampleMemory,
    /// Re-execute the supervisor in the same pid after the current batch (`clusterctl
    /// upgrade`, handover.rs / upgrade.rs); the client holding `ticket` gets the outcome.
    Upgrade {
        ticket: Ticket,
        wait: bool,
        binary: Option<std::path::PathBuf>,
    },
    /// All workers are gone: exit the supervisor with this code.
    Exit { code: u8 },
}

/// What a look at the accept queues found (see `crate::idle::Watched::backlog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Connections waiting to be accepted now.
    pub waiting: u32,
    /// Of those, the ones that were already waiting at the previous probe.
    pub stuck: u32,
    /// Connections a worker has accepted are open: the workers do use the sockets.
    pub accepting: bool,
}

/// Identifies a worker in log lines; defined by the log, which must not depend on the
/// supervisor.
pub use crate::log::WorkerTag;

/// Formats a duration for humans in log lines: `250ms`, `1.5s`, `2m30s`, `6h12m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let tenths = ms / 100;
        if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
    } else if ms < 3_600_000 {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(30)), "30s");
        assert_eq!(human(Duration::from_secs(150)), "2m30s");
        assert_eq!(human(Duration::from_secs(6 * 3600 + 725)), "6h12m");
        assert_eq!(ExitKind::Signal(9).to_string(), "signal SIGKILL");
        assert_eq!(ExitKind::Code(3).to_string(), "exit code 3");
    }
}
