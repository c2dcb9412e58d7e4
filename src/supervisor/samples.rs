//! What the executor measures for the state machine: the accept queues
//! (`Action::ProbeAccepting`) and the workers' memory (`Action::SampleMemory`), each
//! answered with an event.

use super::event::{Backlog, Event};
use super::{Executor, memory, state};

impl Executor {
    /// Looks at the listening sockets' accept queues: connections waiting, and those that
    /// already waited at the previous probe.
    pub(super) fn probe_accepting(&mut self) -> Event {
        let found = match self.accept_watch.accept_queue() {
            Ok((waiting, accepting)) => {
                let stuck = waiting.intersection(&self.unaccepted).count();
                let b = Backlog {
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
        Event::Backlog(found)
    }

    /// The resident memory of each starting or ready worker's process tree.
    pub(super) fn sample_memory(&self) -> Event {
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
        Event::Memory(samples)
    }
}
