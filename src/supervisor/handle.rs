//! The supervisor's transition function: `handle(state, event, now) -> actions`.
//!
//! Pure: no system calls, no clock, no I/O. Everything that happens comes in as an `Event`
//! with the current time, everything to do goes out as an `Action`. That is what makes the
//! crash/backoff/reload/rollback logic testable with a fake clock and fake pids (see the
//! tests in handle/tests.rs).
//!
//! `handle()` is a dispatcher; the transitions live by concern in handle/lifecycle.rs
//! (spawn, ready, exit, backoff, give-up, stop), handle/reload.rs (reload, rollback,
//! rolling, settle), handle/scale.rs (scale, idle/lazy, recycling) and handle/tick.rs
//! (deadlines). `settle()` runs after every event: consequences of the new state.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::Level;

use super::event::{Action, Backlog, Event, ExitKind, Ticket, WorkerTag, human};
use super::state::{
    ACCEPT_PROBE_FIRST, ACCEPT_PROBE_FOR, ACCEPT_PROBE_MAX, AcceptProbe, EXTEND_BY, EXTEND_EVERY,
    GIVE_UP_QUIET, MEMORY_SAMPLE_EVERY, MEMORY_SAMPLES, NO_READY_HINT_AFTER, Phase, Queued,
    Recycle, RecycleReason, Reload, ReloadKind, STABLE_AFTER, START_ATTEMPTS, State, StopReason,
    Worker, WorkerPhase,
};
use crate::config::{MAX_WORKERS, ReadyMode};
use crate::error::exit;
use crate::notify::{NotifyMsg, Upstream};

mod lifecycle;
mod reload;
mod scale;
mod tick;

use self::lifecycle::{
    Refill, arm_accept_probe, backlog, drain, establish, exited, keep_one_coming, kill_all,
    kill_now, mark_ready, notified, ready_hint, schedule_respawn, spawn_failed, spawned, stop,
    watchdog_miss,
};
use self::reload::{request_reload, rollback, settle_reload, start_queued_reload};
use self::scale::{
    cancel_recycle, idle_timeout, memory, recycle_failed, recycling, scale, traffic, unit_interval,
};
use self::tick::{arm_watchdog, tick};

/// Applies one event at time `now` and returns what to do, in order.
pub fn handle(state: &mut State, event: Event, now: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    match event {
        Event::Start if state.cfg.lazy => {
            state.phase = Phase::Idle;
            // The first connection starts generation 1.
            state.newest_generation = 0;
            arm_watchdog(state, now);
            let msg = "holding the sockets; workers start on the first connection";
            log(&mut out, Level::INFO, None, msg.into());
        }
        Event::Start => {
            arm_watchdog(state, now);
            for slot in 0..state.desired() {
                out.push(Action::Spawn {
                    slot,
                    generation: 1,
                });
            }
        }
        Event::Traffic { busy } => traffic(state, busy, now, &mut out),
        Event::Spawned {
            slot,
            generation,
            pid,
        } => spawned(state, slot, generation, pid, now, &mut out),
        Event::SpawnFailed {
            slot,
            generation,
            error,
            permanent,
        } => spawn_failed(state, slot, generation, &error, permanent, now, &mut out),
        Event::Exited { pid, how } => exited(state, pid, how, now, &mut out),
        Event::Notify { pid, msg } => notified(state, pid, &msg, now, &mut out),
        Event::Stop => stop(state, exit::OK, now, &mut out),
        Event::Reload { ticket, wait } => {
            let rolling = state.cfg.rolling;
            request_reload(state, rolling, ticket, wait, &mut out);
        }
        Event::RollingRestart { ticket, wait } => {
            request_reload(state, true, ticket, wait, &mut out);
        }
        Event::Scale { workers, ticket } => {
            let result = scale(state, workers, now, &mut out);
            match (ticket, result) {
                (Some(ticket), result) => out.push(Action::Answer { ticket, result }),
                (None, Err(e)) => log(&mut out, Level::WARN, None, format!("not scaling: {e}")),
                (None, Ok(_)) => {}
            }
        }
        Event::ScaleStep { up } => {
            let n = state.desired();
            let workers = if up { n + 1 } else { n.saturating_sub(1) };
            let result = scale(state, workers, now, &mut out);
            if let Err(e) = result {
                log(&mut out, Level::WARN, None, format!("not scaling: {e}"));
            }
        }
        Event::Status { ticket, json } => out.push(Action::Report { ticket, json }),
        Event::Backlog(b) => backlog(state, b, now, &mut out),
        Event::Memory(samples) => memory(state, &samples),
        // The state survives the exec (handover.rs); only a stopping supervisor refuses.
        Event::Upgrade {
            ticket,
            wait,
            binary,
        } => out.push(if matches!(state.phase, Phase::Stopping { .. }) {
            Action::Answer {
                ticket,
                result: Err("upgrade refused: the supervisor is stopping".into()),
            }
        } else {
            Action::Upgrade {
                ticket,
                wait,
                binary,
            }
        }),
        Event::Tick => tick(state, now, &mut out),
    }
    settle(state, now, &mut out);
    merge_notifications(out)
}

/// Everything one event tells systemd travels in one datagram (e.g. `READY=1` together
/// with its `STATUS=`), at the position of the last notification.
fn merge_notifications(actions: Vec<Action>) -> Vec<Action> {
    let count = actions
        .iter()
        .filter(|a| matches!(a, Action::Notify(_)))
        .count();
    if count < 2 {
        return actions;
    }
    let mut merged = Vec::new();
    let mut seen = 0;
    let mut out = Vec::with_capacity(actions.len() - count + 1);
    for a in actions {
        match a {
            Action::Notify(m) => {
                merged.extend(m);
                seen += 1;
                if seen == count {
                    out.push(Action::Notify(std::mem::take(&mut merged)));
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn log(out: &mut Vec<Action>, level: Level, worker: Option<WorkerTag>, message: String) {
    out.push(Action::Log {
        level,
        worker,
        message,
    });
}

/// Consequences that follow from the new state, whatever the event: readiness of the
/// first generation, progress of a reload, the STATUS line, and exiting.
fn settle(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    let n = state.desired();
    if state.phase == Phase::Idle && !state.announced {
        state.announced = true;
        out.push(Action::Notify(vec![Upstream::Ready]));
    }
    if state.phase == Phase::Starting && state.established_count_current() == n as usize {
        state.phase = Phase::Running;
        state.last_busy = Some(now);
        arm_accept_probe(state, now);
        log(out, Level::INFO, None, format!("all {n} workers ready"));
        if !state.announced {
            state.announced = true;
            out.push(Action::Notify(vec![Upstream::Ready]));
        }
    }
    settle_reload(state, now, out);
    start_queued_reload(state, now, out);
    // After the reload step: a reload that just ended may leave the pool idle for long.
    idle_timeout(state, now, out);
    keep_one_coming(state, now, out);
    recycling(state, now, out);
    let status = state.status_line();
    if status != state.last_status
        && !matches!(state.phase, Phase::Stopping { code, .. } if code != exit::OK)
    {
        state.last_status.clone_from(&status);
        out.push(Action::Notify(vec![Upstream::Status(status)]));
    }
    if matches!(state.phase, Phase::Stopping { .. }) && state.workers.is_empty() {
        let Phase::Stopping { code, .. } = state.phase else {
            unreachable!()
        };
        out.push(Action::Exit { code });
    }
}

#[cfg(test)]
mod tests;
