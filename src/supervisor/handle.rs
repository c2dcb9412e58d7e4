//! The supervisor's transition function: `handle(state, event, now) -> actions`.
//!
//! Pure: no system calls, no clock, no I/O. Everything that happens comes in as an `Event`
//! with the current time, everything to do goes out as an `Action`. That is what makes the
//! crash/backoff/reload/rollback logic testable with a fake clock and fake pids (see the
//! tests at the bottom).

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

/// Should a worker of `generation` be started in `slot` now? Not stopping, the slot exists
/// and runs (or is being moved to) `generation`, and has no live worker of it yet.
fn needs_worker(state: &State, slot: u32, generation: u32) -> bool {
    if matches!(state.phase, Phase::Stopping { .. }) || slot >= state.desired() {
        return false;
    }
    let reloading = state
        .reload
        .as_ref()
        .is_some_and(|r| r.generation == generation);
    (state.slots[slot as usize].generation == generation || reloading)
        && state.live_in(generation, slot).is_none()
}

fn spawned(
    state: &mut State,
    slot: u32,
    generation: u32,
    pid: Pid,
    now: Instant,
    out: &mut Vec<Action>,
) {
    // The replacement of a slot being recycled (its old worker still serves).
    let replacement = match &mut state.recycle {
        Some(r) if r.slot == slot && r.generation == generation && r.new.is_none() => {
            r.new = Some(pid);
            true
        }
        _ => false,
    };
    let wanted = replacement || needs_worker(state, slot, generation);
    let phase = if !wanted {
        out.push(Action::Kill {
            pid,
            signal: Signal::SIGKILL,
            group: true,
        });
        WorkerPhase::Killed {
            reason: StopReason::Unwanted,
        }
    } else if state.cfg.ready == ReadyMode::Exec {
        WorkerPhase::Ready {
            since: now,
            last_ping: now,
        }
    } else {
        WorkerPhase::Starting {
            deadline: now + state.cfg.ready_timeout,
            ready_at: match state.cfg.ready {
                ReadyMode::After(d) => Some(now + d),
                _ => None,
            },
        }
    };
    let w = Worker {
        slot,
        generation,
        pid,
        started: now,
        phase,
        status: None,
        established: false,
        recycle_at: state.cfg.max_worker_age.map(|a| {
            now + a.pick(unit_interval(
                state.seed,
                u64::from(slot) << 32 | u64::from(generation),
                pid,
            ))
        }),
        rss: None,
        rss_over: 0,
    };
    log(
        out,
        Level::INFO,
        Some(w.tag()),
        format!("worker {slot} started (pid {pid}, generation {generation})"),
    );
    let ready = w.phase.is_ready();
    if ready {
        log(
            out,
            Level::INFO,
            Some(w.tag()),
            format!("worker {slot} ready (--ready exec)"),
        );
    }
    state.workers.push(w);
    if ready && state.cfg.min_uptime.is_zero() {
        establish(state, pid, now);
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_failed(
    state: &mut State,
    slot: u32,
    generation: u32,
    error: &str,
    permanent: bool,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let t = Some(WorkerTag {
        slot,
        generation,
        pid: None,
    });
    log(
        out,
        Level::ERROR,
        t,
        format!("cannot start worker {slot}: {error}"),
    );
    if state
        .recycle
        .is_some_and(|r| r.slot == slot && r.generation == generation && r.new.is_none())
    {
        recycle_failed(state, &format!("could not be started: {error}"), now, out);
        return;
    }
    if !needs_worker(state, slot, generation) {
        return;
    }
    if state.in_rollout(slot, generation) {
        rollback(
            state,
            &format!("cannot start worker {slot}: {error}"),
            now,
            out,
        );
        return;
    }
    if state.phase == Phase::Starting && permanent {
        abort(
            state,
            exit::CONFIG,
            format!("cannot start workers: {error}"),
            now,
            out,
        );
        return;
    }
    failed_start(
        state,
        slot,
        error,
        Refill::Backoff {
            uptime: Duration::ZERO,
        },
        now,
        out,
    );
}

/// How soon a slot is refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refill {
    /// Its worker started and later died: at once (backoff is for crash loops at boot).
    Now,
    /// Its worker reported ready but died within `--min-uptime`: after the minimum delay,
    /// and the backoff starts over (its boot worked; a storm of kills must not grow it).
    Soon,
    /// Its worker died before it was ready (or could not be started): after the slot's
    /// delay, which doubles up to the maximum.
    Backoff { uptime: Duration },
}

/// A worker of the slot's current generation ended before it started (before it was
/// ready, or within `--min-uptime` of it), or could not be started: count it, and refill
/// the slot — or give up (see `START_ATTEMPTS`).
fn failed_start(
    state: &mut State,
    slot: u32,
    why: &str,
    refill: Refill,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let s = &mut state.slots[slot as usize];
    s.failed_starts += 1;
    if state.phase == Phase::Starting && s.failed_starts >= START_ATTEMPTS {
        let hint = if state.last_established.is_none() {
            "no worker ever started, giving up"
        } else {
            "giving up"
        };
        let msg = format!(
            "worker {slot} failed to start {START_ATTEMPTS} times in a row (last: {why}); {hint}"
        );
        abort(state, exit::FAILURE, msg, now, out);
        return;
    }
    let quiet = state
        .last_established
        .is_none_or(|t| now.saturating_duration_since(t) >= GIVE_UP_QUIET);
    if state.phase == Phase::Running
        && quiet
        && state
            .slots
            .iter()
            .all(|s| s.failed_starts >= START_ATTEMPTS)
    {
        let msg = format!(
            "every worker failed to start {START_ATTEMPTS} times in a row and none stayed up \
             for --min-uptime {} after it was ready in the last {} (last: worker {slot} {why}); \
             giving up",
            human(state.cfg.min_uptime),
            human(GIVE_UP_QUIET)
        );
        abort(state, exit::FAILURE, msg, now, out);
        return;
    }
    schedule_respawn(state, slot, refill, now, out);
}

fn schedule_respawn(
    state: &mut State,
    slot: u32,
    refill: Refill,
    now: Instant,
    out: &mut Vec<Action>,
) {
    let restart = state.cfg.restart;
    let s = &mut state.slots[slot as usize];
    let delay = match refill {
        Refill::Now => {
            s.delay = restart.min;
            Duration::ZERO
        }
        Refill::Soon => {
            // Its boot worked: a crash at boot after it backs off from the minimum again.
            s.delay = restart.min;
            restart.min
        }
        Refill::Backoff { uptime } => {
            if uptime >= STABLE_AFTER {
                s.delay = restart.min;
            }
            let delay = s.delay;
            s.delay = (delay * 2).clamp(restart.min, restart.max);
            delay
        }
    };
    s.restarts += 1;
    let generation = s.generation;
    let t = Some(WorkerTag {
        slot,
        generation,
        pid: None,
    });
    if delay.is_zero() {
        s.respawn_at = None;
        log(out, Level::INFO, t, format!("restarting worker {slot} now"));
        out.push(Action::Spawn { slot, generation });
    } else {
        s.respawn_at = Some(now + delay);
        log(
            out,
            Level::INFO,
            t,
            format!("restarting worker {slot} in {}", human(delay)),
        );
    }
}

/// The hint for a worker that never sent `READY=1`, when nothing else was ever ready.
fn ready_hint(state: &State) -> &'static str {
    if state.cfg.ready == ReadyMode::Notify && !state.ready_seen {
        " (no READY=1 arrived on its NOTIFY_SOCKET: for a server without sd_notify support \
         use --ready after:DUR, ready DUR after start, or --ready exec, ready at once)"
    } else {
        ""
    }
}

fn exited(state: &mut State, pid: Pid, how: ExitKind, now: Instant, out: &mut Vec<Action>) {
    let Some(idx) = state.workers.iter().position(|w| w.pid == pid) else {
        return; // an orphaned descendant we reaped as subreaper
    };
    let w = state.workers.swap_remove(idx);
    let uptime = now.saturating_duration_since(w.started);
    let slot_gen = state.slots.get(w.slot as usize).map(|s| s.generation);
    if slot_gen == Some(w.generation) {
        state.slots[w.slot as usize].last_exit = Some(how);
    }
    let reason = w.phase.stop_reason();
    if let Some(reason) = reason.filter(|r| !r.is_failure()) {
        log(
            out,
            Level::INFO,
            Some(w.tag()),
            format!(
                "worker {} exited ({how}) after {}: {}",
                w.slot,
                human(uptime),
                reason
            ),
        );
        return;
    }
    let timed_out = reason == Some(StopReason::ReadyTimeout);
    // Only a ready worker can miss its watchdog.
    let was_ready = w.phase.is_ready() || reason == Some(StopReason::Watchdog);
    let why = if timed_out {
        format!(
            "was not ready within {}{}",
            human(state.cfg.ready_timeout),
            ready_hint(state)
        )
    } else if reason == Some(StopReason::Watchdog) {
        format!("ended ({how}) after missing its watchdog")
    } else if w.established {
        format!("exited unexpectedly ({how}) after {}", human(uptime))
    } else if let WorkerPhase::Ready { since, .. } = w.phase {
        format!(
            "exited ({how}) {} after it was ready, within --min-uptime {}",
            human(now.saturating_duration_since(since)),
            human(state.cfg.min_uptime)
        )
    } else {
        format!("exited ({how}) before it was ready")
    };
    if state.recycle.is_some_and(|r| r.new == Some(pid)) {
        recycle_failed(state, &why, now, out);
        return;
    }
    if !timed_out {
        log(
            out,
            Level::WARN,
            Some(w.tag()),
            format!("worker {} {why}", w.slot),
        );
    }
    if matches!(state.phase, Phase::Stopping { .. } | Phase::Idle) {
        return;
    }
    if state.in_rollout(w.slot, w.generation) {
        // A worker of the generation being rolled out, not yet accepted for its slot.
        if !timed_out {
            rollback(
                state,
                &format!("worker {} of generation {} {why}", w.slot, w.generation),
                now,
                out,
            );
        }
        return;
    }
    if slot_gen != Some(w.generation) || state.live_in(w.generation, w.slot).is_some() {
        return; // an old generation's worker: nothing to refill
    }
    if w.established {
        state.slots[w.slot as usize].failed_starts = 0;
        schedule_respawn(state, w.slot, Refill::Now, now, out);
    } else {
        // With --ready exec, "ready" says nothing: only established counts.
        let refill = if was_ready && state.cfg.ready != ReadyMode::Exec {
            Refill::Soon
        } else {
            Refill::Backoff { uptime }
        };
        failed_start(state, w.slot, &why, refill, now, out);
    }
}

fn notified(state: &mut State, pid: Pid, msg: &NotifyMsg, now: Instant, out: &mut Vec<Action>) {
    let Some(w) = state.worker_mut(pid) else {
        return;
    };
    if let Some(s) = &msg.status {
        w.status = Some(s.clone());
    }
    if let WorkerPhase::Ready { last_ping, .. } = &mut w.phase
        && msg.watchdog
    {
        *last_ping = now;
    }
    if msg.ready && matches!(w.phase, WorkerPhase::Starting { .. }) {
        mark_ready(state, pid, now, out);
    }
    if msg.watchdog_trigger && state.cfg.worker_watchdog.is_some() {
        watchdog_miss(state, pid, "it sent WATCHDOG=trigger", now, out);
    }
}

/// A worker missed its watchdog: SIGABRT (for a core dump), SIGKILL after stop-timeout,
/// and it is replaced like a crashed worker.
fn watchdog_miss(state: &mut State, pid: Pid, why: &str, now: Instant, out: &mut Vec<Action>) {
    let timeout = state.cfg.stop_timeout;
    let Some(w) = state.worker_mut(pid) else {
        return;
    };
    if !matches!(w.phase, WorkerPhase::Ready { .. }) {
        return;
    }
    w.phase = WorkerPhase::Draining {
        kill_at: now + timeout,
        reason: StopReason::Watchdog,
    };
    let msg = format!(
        "worker {} missed its watchdog ({why}): sending SIGABRT",
        w.slot
    );
    log(out, Level::WARN, Some(w.tag()), msg);
    out.push(Action::Kill {
        pid,
        signal: Signal::SIGABRT,
        group: false,
    });
}

/// A traffic sample: remember activity; a lazy supervisor starts its workers.
fn traffic(state: &mut State, busy: bool, now: Instant, out: &mut Vec<Action>) {
    // The next sample counts from this one's end (a slow sample must not make it due at
    // once); `sampling` disarms it where it does not apply.
    if let Some(every) = state.cfg.traffic_sample_every()
        && state.traffic_sample_at.is_some()
    {
        state.traffic_sample_at = Some(now + every);
    }
    if !busy {
        return;
    }
    state.last_busy = Some(now);
    if state.phase == Phase::Idle {
        let generation = state.newest_generation + 1;
        state.newest_generation = generation;
        state.serving_generation = generation;
        log(
            out,
            Level::INFO,
            None,
            format!("connection waiting: starting generation {generation}"),
        );
        state.phase = Phase::Starting;
        for slot in 0..state.desired() {
            let s = &mut state.slots[slot as usize];
            s.generation = generation;
            s.failed_starts = 0;
            s.delay = state.cfg.restart.min;
            out.push(Action::Spawn { slot, generation });
        }
    }
}

/// No connection for `--exit-idle-after`: exit (systemd's socket unit starts us again on
/// the next connection), or with `--lazy` stop the workers and hold the sockets.
fn idle_timeout(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    let Some(d) = state.cfg.exit_idle_after else {
        return;
    };
    let due = state.phase == Phase::Running
        && state.reload.is_none()
        && state.queued.is_none()
        && state.last_busy.is_some_and(|b| b + d <= now);
    if !due {
        return;
    }
    if state.cfg.lazy {
        log(
            out,
            Level::INFO,
            None,
            format!(
                "no connection for {}: stopping the workers, holding the sockets",
                human(d)
            ),
        );
        state.recycle = None;
        state.phase = Phase::Idle;
        for s in &mut state.slots {
            s.respawn_at = None;
        }
        let pids: Vec<Pid> = state.workers.iter().map(|w| w.pid).collect();
        for pid in pids {
            drain(state, pid, StopReason::Idle, now, out);
        }
    } else {
        log(
            out,
            Level::INFO,
            None,
            format!("no connection for {}: exiting until the next one", human(d)),
        );
        stop(state, exit::OK, now, out);
    }
}

/// Changes the number of workers: new slots start at once; the highest slots are drained.
/// Returns the answer for the client that asked.
fn scale(
    state: &mut State,
    workers: u32,
    now: Instant,
    out: &mut Vec<Action>,
) -> Result<String, String> {
    let old = state.desired();
    if workers == 0 || workers > MAX_WORKERS {
        return Err(format!(
            "cannot scale to {workers} workers: the range is 1..={MAX_WORKERS}"
        ));
    }
    if matches!(state.phase, Phase::Stopping { .. }) {
        return Err("the supervisor is stopping".into());
    }
    if state.reload.is_some() || state.queued.is_some() {
        return Err(format!(
            "cannot scale to {workers} workers now: a reload is in progress; scale again \
             when it finished"
        ));
    }
    if workers == old {
        return Ok(format!("already running {workers} workers"));
    }
    log(
        out,
        Level::INFO,
        None,
        format!("scaling from {old} to {workers} workers"),
    );
    cancel_recycle(state, "the pool is scaled", now, out);
    if workers > old {
        for slot in old..workers {
            let mut s = super::state::Slot::new(&state.cfg);
            s.generation = state.serving_generation;
            state.slots.push(s);
            if state.phase != Phase::Idle {
                out.push(Action::Spawn {
                    slot,
                    generation: state.serving_generation,
                });
            }
        }
    } else {
        state.slots.truncate(workers as usize);
        let pids: Vec<Pid> = state
            .workers
            .iter()
            .filter(|w| w.slot >= workers)
            .map(|w| w.pid)
            .collect();
        for pid in pids {
            drain(state, pid, StopReason::ScaledDown, now, out);
        }
    }
    Ok(format!("scaling from {old} to {workers} workers"))
}

fn mark_ready(state: &mut State, pid: Pid, now: Instant, out: &mut Vec<Action>) {
    let Some(w) = state.worker_mut(pid) else {
        return;
    };
    w.phase = WorkerPhase::Ready {
        since: now,
        last_ping: now,
    };
    let took = now.saturating_duration_since(w.started);
    let slot = w.slot;
    let t = Some(w.tag());
    log(
        out,
        Level::INFO,
        t,
        format!("worker {slot} ready after {}", human(took)),
    );
    state.ready_seen = true;
    if state.cfg.min_uptime.is_zero() {
        establish(state, pid, now);
    }
}

/// A ready worker stayed up `--min-uptime`: it started (its slot's failed starts are
/// forgotten, a reload or the first generation may count it).
fn establish(state: &mut State, pid: Pid, now: Instant) {
    let Some(w) = state.worker_mut(pid) else {
        return;
    };
    if w.established || !matches!(w.phase, WorkerPhase::Ready { .. }) {
        return;
    }
    w.established = true;
    let (slot, generation) = (w.slot, w.generation);
    let reloading = state
        .reload
        .as_ref()
        .is_some_and(|r| r.generation == generation);
    if let Some(s) = state.slots.get_mut(slot as usize)
        && (s.generation == generation || reloading)
    {
        if s.generation == generation {
            s.failed_starts = 0;
        }
        state.last_established = Some(now);
    }
}

/// Arms the check that the generation now serving accepts connections.
fn arm_accept_probe(state: &mut State, now: Instant) {
    state.accept_probe = Some(AcceptProbe {
        generation: state.serving_generation,
        at: now + ACCEPT_PROBE_FIRST,
        prev: None,
        interval: ACCEPT_PROBE_FIRST * 2,
        until: now + ACCEPT_PROBE_FOR,
    });
}

/// A look at the accept queues came back: warn once about connections nobody accepts;
/// stop looking once the workers are seen accepting; else look again later.
fn backlog(state: &mut State, found: Option<Backlog>, now: Instant, out: &mut Vec<Action>) {
    let Some(mut p) = state.accept_probe else {
        return;
    };
    let Some(b) = found else {
        state.accept_probe = None;
        return;
    };
    if b.stuck > 0 {
        let waited = p.prev.map_or(String::new(), |t| {
            format!(" for {}", human(now.saturating_duration_since(t)))
        });
        let msg = format!(
            "{} connection(s) waited in the listening socket's accept queue{waited} and no \
             worker accepted them: the workers of generation {} do not seem to use the \
             inherited socket. clusterctl passes it as fd 3 (LISTEN_FDS=1, LISTEN_PID=the \
             worker's pid); make the server listen on that fd (for example gunicorn --bind \
             fd://3, uvicorn --fd 3) instead of binding a port of its own",
            b.stuck, p.generation
        );
        log(out, Level::WARN, None, msg);
        state.accept_probe = None;
        return;
    }
    if b.accepting {
        state.accept_probe = None;
        return;
    }
    p.prev = Some(now);
    p.at = if b.waiting > 0 {
        // Look again soon: still there then means nobody accepts them.
        now + ACCEPT_PROBE_FIRST
    } else {
        let at = now + p.interval;
        p.interval = (p.interval * 2).min(ACCEPT_PROBE_MAX);
        at
    };
    state.accept_probe = (p.at <= p.until).then_some(p);
}

/// Asks a worker to drain: the stop signal now, SIGKILL to its group after stop-timeout.
fn drain(state: &mut State, pid: Pid, reason: StopReason, now: Instant, out: &mut Vec<Action>) {
    let (signal, timeout) = (state.cfg.stop_signal, state.cfg.stop_timeout);
    if let Some(w) = state.worker_mut(pid)
        && w.phase.is_live()
    {
        w.phase = WorkerPhase::Draining {
            kill_at: now + timeout,
            reason,
        };
        out.push(Action::Kill {
            pid,
            signal,
            group: false,
        });
    }
}

/// SIGKILLs a worker's process group. A worker already draining keeps the reason it was
/// stopped for.
fn kill_now(state: &mut State, pid: Pid, reason: StopReason, out: &mut Vec<Action>) {
    if let Some(w) = state.worker_mut(pid)
        && !matches!(w.phase, WorkerPhase::Killed { .. })
    {
        w.phase = WorkerPhase::Killed {
            reason: w.phase.stop_reason().unwrap_or(reason),
        };
        out.push(Action::Kill {
            pid,
            signal: Signal::SIGKILL,
            group: true,
        });
    }
}

/// SIGKILLs every worker's process group; stopping, with nothing left to wait for.
fn kill_all(state: &mut State, code: u8, out: &mut Vec<Action>) {
    let pids: Vec<Pid> = state.workers.iter().map(|w| w.pid).collect();
    for pid in pids {
        kill_now(state, pid, StopReason::Shutdown, out);
    }
    state.phase = Phase::Stopping {
        force_at: None,
        code,
    };
}

fn stop(state: &mut State, code: u8, now: Instant, out: &mut Vec<Action>) {
    if let Phase::Stopping { code, .. } = state.phase {
        log(
            out,
            Level::WARN,
            None,
            "second stop request: killing all workers now".into(),
        );
        kill_all(state, code, out);
        return;
    }
    let n = state.workers.len();
    if code == exit::OK {
        log(
            out,
            Level::INFO,
            None,
            format!(
                "stopping {n} worker(s) with {} (up to {})",
                state.cfg.stop_signal.as_str(),
                human(state.cfg.stop_timeout)
            ),
        );
    }
    state.recycle = None;
    state.phase = Phase::Stopping {
        force_at: Some(now + state.cfg.stop_timeout),
        code,
    };
    out.push(Action::Notify(vec![Upstream::Stopping]));
    for s in &mut state.slots {
        s.respawn_at = None;
    }
    let pids: Vec<Pid> = state.workers.iter().map(|w| w.pid).collect();
    for pid in pids {
        drain(state, pid, StopReason::Shutdown, now, out);
    }
    let mut tickets: Vec<Ticket> = state.reload.take().map(|r| r.tickets).unwrap_or_default();
    tickets.extend(state.queued.take().map(|q| q.tickets).unwrap_or_default());
    if !tickets.is_empty() {
        out.push(Action::ReloadFinished {
            tickets,
            result: Err("the supervisor is stopping".into()),
        });
    }
}

/// Stops everything and exits with `code`, logging `reason` as the cause.
fn abort(state: &mut State, code: u8, reason: String, now: Instant, out: &mut Vec<Action>) {
    log(out, Level::ERROR, None, reason.clone());
    stop(state, code, now, out);
    out.push(Action::Notify(vec![Upstream::Status(reason.clone())]));
    state.last_status = reason;
}

fn request_reload(
    state: &mut State,
    rolling: bool,
    ticket: Option<Ticket>,
    wait: bool,
    out: &mut Vec<Action>,
) {
    let answer = |out: &mut Vec<Action>, result: Result<String, String>| {
        if let Some(ticket) = ticket {
            out.push(Action::Answer { ticket, result });
        }
    };
    if matches!(state.phase, Phase::Stopping { .. }) {
        answer(out, Err("the supervisor is stopping".into()));
        return;
    }
    if state.phase == Phase::Idle {
        // No workers to replace: the next start runs the new code anyway.
        log(
            out,
            Level::INFO,
            None,
            "reload while idle: nothing to replace".into(),
        );
        out.push(Action::Notify(vec![Upstream::Reloading, Upstream::Ready]));
        if wait {
            out.push(Action::ReloadFinished {
                tickets: ticket.into_iter().collect(),
                result: Ok(state.serving_generation),
            });
        } else {
            answer(
                out,
                Ok("reload requested: nothing to replace while idle".into()),
            );
        }
        return;
    }
    let q = state.queued.get_or_insert_with(Queued::default);
    q.rolling |= rolling;
    if wait {
        q.tickets.extend(ticket);
    }
    if state.reload.is_some() {
        log(
            out,
            Level::INFO,
            None,
            "reload requested while one runs: it will follow".into(),
        );
    }
    if !wait {
        answer(
            out,
            Ok(if state.reload.is_some() {
                "reload requested: it follows the one in progress".into()
            } else {
                "reload requested".into()
            }),
        );
    }
}

/// Starts the queued reload, if there is one and nothing else is in the way: the first
/// generation is up, no reload runs, and no older generation is still draining (so never
/// more than two generations are alive).
fn start_queued_reload(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    if state.phase != Phase::Running || state.reload.is_some() || state.queued.is_none() {
        return;
    }
    let draining = state.workers.iter().any(|w| !state.is_current(w));
    if draining {
        return;
    }
    // The reload replaces every worker anyway.
    cancel_recycle(state, "a reload starts", now, out);
    let q = state.queued.take().unwrap_or_default();
    let generation = state.newest_generation + 1;
    state.newest_generation = generation;
    let kind = if q.rolling {
        ReloadKind::Rolling { slot: 0 }
    } else {
        ReloadKind::Surge
    };
    let what = match kind {
        ReloadKind::Surge => "reload",
        ReloadKind::Rolling { .. } => "rolling restart",
    };
    log(
        out,
        Level::INFO,
        None,
        format!("{what}: starting generation {generation}"),
    );
    out.push(Action::Notify(vec![Upstream::Reloading]));
    state.reload = Some(Reload {
        generation,
        kind,
        started: now,
        tickets: q.tickets,
        // Right away (the next tick), then every EXTEND_EVERY.
        extend_at: Some(now),
    });
    match kind {
        ReloadKind::Surge => {
            for slot in 0..state.desired() {
                out.push(Action::Spawn { slot, generation });
            }
        }
        ReloadKind::Rolling { slot } => out.push(Action::Spawn { slot, generation }),
    }
}

/// The generation being rolled out failed: stop what it started, keep the old workers.
fn rollback(state: &mut State, reason: &str, now: Instant, out: &mut Vec<Action>) {
    let Some(r) = state.reload.take() else {
        return;
    };
    let msg = format!(
        "reload to generation {} failed: {reason}; rolled back",
        r.generation
    );
    log(out, Level::ERROR, None, msg.clone());
    let pids: Vec<Pid> = state
        .workers
        .iter()
        .filter(|w| w.generation == r.generation && !state.is_current(w))
        .map(|w| w.pid)
        .collect();
    for pid in pids {
        drain(state, pid, StopReason::RolledBack, now, out);
    }
    state.last_reload = Some((now, Err(msg.clone())));
    out.push(Action::ReloadFinished {
        tickets: r.tickets,
        result: Err(msg),
    });
    out.push(Action::Notify(vec![Upstream::Ready]));
}

fn finish_reload(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    let Some(r) = state.reload.take() else {
        return;
    };
    state.serving_generation = r.generation;
    let took = now.saturating_duration_since(r.started);
    log(
        out,
        Level::INFO,
        None,
        format!(
            "generation {} serving (reload took {})",
            r.generation,
            human(took)
        ),
    );
    state.last_reload = Some((now, Ok(r.generation)));
    arm_accept_probe(state, now);
    out.push(Action::ReloadFinished {
        tickets: r.tickets,
        result: Ok(r.generation),
    });
    out.push(Action::Notify(vec![Upstream::Ready]));
}

fn tick(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    let mut became_ready = Vec::new();
    let mut timed_out = Vec::new();
    let mut overdue = Vec::new();
    let mut missed = Vec::new();
    let mut established = Vec::new();
    let mut silent = None;
    for w in &state.workers {
        if let WorkerPhase::Ready { since, .. } = w.phase
            && !w.established
            && since + state.cfg.min_uptime <= now
        {
            established.push(w.pid);
        }
        if let WorkerPhase::Starting { .. } = w.phase
            && state.cfg.ready == ReadyMode::Notify
            && w.generation > state.hinted_generation
            && w.started + NO_READY_HINT_AFTER <= now
            && silent.is_none()
        {
            silent = Some(w.clone());
        }
        if let (WorkerPhase::Ready { last_ping: p, .. }, Some(wd)) =
            (w.phase, state.cfg.worker_watchdog)
            && p + wd <= now
        {
            missed.push((w.pid, now.saturating_duration_since(p)));
        }
        match w.phase {
            WorkerPhase::Starting {
                ready_at: Some(r), ..
            } if r <= now => became_ready.push(w.pid),
            WorkerPhase::Starting { deadline, .. } if deadline <= now => timed_out.push(w.pid),
            WorkerPhase::Draining { kill_at, .. } if kill_at <= now => overdue.push(w.pid),
            _ => {}
        }
    }
    for pid in established {
        establish(state, pid, now);
    }
    if let Some(w) = silent {
        state.hinted_generation = w.generation;
        let msg = format!(
            "worker {} has not sent READY=1 {} after it started; waiting up to --ready-timeout \
             {}{}",
            w.slot,
            human(now.saturating_duration_since(w.started)),
            human(state.cfg.ready_timeout),
            if state.ready_seen {
                ""
            } else {
                ". A server without sd_notify support never sends it: run it with --ready \
                 after:DUR (ready DUR after start) or --ready exec (ready at once)"
            }
        );
        log(out, Level::WARN, Some(w.tag()), msg);
    }
    for pid in became_ready {
        mark_ready(state, pid, now, out);
    }
    for (pid, silent) in missed {
        watchdog_miss(
            state,
            pid,
            &format!("no WATCHDOG=1 for {}", human(silent)),
            now,
            out,
        );
    }
    for pid in overdue {
        if let Some(w) = state.worker(pid) {
            log(
                out,
                Level::WARN,
                Some(w.tag()),
                format!(
                    "worker {} did not exit within {} of {}: killing it",
                    w.slot,
                    human(state.cfg.stop_timeout),
                    state.cfg.stop_signal.as_str()
                ),
            );
        }
        kill_now(state, pid, StopReason::Shutdown, out);
    }
    for pid in timed_out {
        let Some(w) = state.worker(pid) else { continue };
        let (slot, generation) = (w.slot, w.generation);
        let msg = format!(
            "worker {slot} was not ready within {}: killing it{}",
            human(state.cfg.ready_timeout),
            ready_hint(state)
        );
        log(out, Level::WARN, Some(w.tag()), msg);
        kill_now(state, pid, StopReason::ReadyTimeout, out);
        if state.in_rollout(slot, generation) {
            let why = format!(
                "worker {slot} was not ready within {}",
                human(state.cfg.ready_timeout)
            );
            rollback(state, &why, now, out);
        }
    }
    if state.phase == Phase::Running
        && let Some(p) = &mut state.accept_probe
        && p.at <= now
    {
        // Not again before the answer (`Event::Backlog`) re-arms it.
        p.at = p.until + Duration::from_secs(1);
        out.push(Action::ProbeAccepting);
    }
    if state.recycle_retry_at.is_some_and(|t| t <= now) {
        state.recycle_retry_at = None;
    }
    housekeeping(state, now, out);
    if let Some(t) = state.memory_sample_at
        && t <= now
    {
        state.memory_sample_at = Some(now + MEMORY_SAMPLE_EVERY);
        out.push(Action::SampleMemory);
    }
    idle_timeout(state, now, out);
    if let Phase::Stopping {
        force_at: Some(t),
        code,
    } = state.phase
        && t <= now
    {
        kill_all(state, code, out);
    }
    if matches!(state.phase, Phase::Starting | Phase::Running) {
        for slot in 0..state.desired() {
            let s = &mut state.slots[slot as usize];
            if s.respawn_at.is_some_and(|t| t <= now) {
                s.respawn_at = None;
                out.push(Action::Spawn {
                    slot,
                    generation: s.generation,
                });
            }
        }
    }
}

/// systemd's watchdog for the supervisor: pinged from the start, every half interval.
fn arm_watchdog(state: &mut State, now: Instant) {
    state.watchdog_ping_at = state.cfg.systemd_watchdog.map(|_| now);
}

/// The periodic work fired by a tick: systemd's watchdog, its reload timeout, traffic
/// samples.
fn housekeeping(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    if let (Some(interval), Some(at)) = (state.cfg.systemd_watchdog, state.watchdog_ping_at)
        && at <= now
    {
        out.push(Action::Notify(vec![Upstream::Watchdog]));
        state.watchdog_ping_at = Some(now + interval / 2);
    }
    let workers = state.desired();
    if let Some(r) = &mut state.reload
        && let Some(at) = r.extend_at
        && at <= now
    {
        let limit = r.started + r.budget(&state.cfg, workers);
        r.extend_at = if now < limit {
            out.push(Action::Notify(vec![Upstream::ExtendTimeout(EXTEND_BY)]));
            Some(now + EXTEND_EVERY)
        } else {
            None
        };
    }
    if let Some(t) = state.traffic_sample_at
        && t <= now
    {
        // Not again before the sample (`Event::Traffic`) re-arms it.
        state.traffic_sample_at = Some(now + Duration::from_secs(3600));
        out.push(Action::SampleTraffic);
    }
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
    if let Some(r) = state.reload.clone() {
        let g = r.generation;
        // Ready, and up for --min-uptime since: a worker that dies right after READY=1
        // (gunicorn's master reports ready before its workers import the app) fails the
        // reload instead of replacing a good generation.
        let ready_in = |state: &State, slot: u32| {
            state
                .live_in(g, slot)
                .is_some_and(|w| matches!(w.phase, WorkerPhase::Ready { .. }) && w.established)
        };
        match r.kind {
            ReloadKind::Surge if (0..n).all(|s| ready_in(state, s)) => {
                let old: Vec<Pid> = state
                    .workers
                    .iter()
                    .filter(|w| w.generation != g)
                    .map(|w| w.pid)
                    .collect();
                let min = state.cfg.restart.min;
                for s in &mut state.slots {
                    s.generation = g;
                    s.failed_starts = 0;
                    s.respawn_at = None;
                    // A new generation starts with fresh backoff.
                    s.delay = min;
                }
                for pid in old {
                    drain(state, pid, StopReason::Replaced, now, out);
                }
                finish_reload(state, now, out);
            }
            ReloadKind::Rolling { slot } if ready_in(state, slot) => {
                let min = state.cfg.restart.min;
                let s = &mut state.slots[slot as usize];
                s.generation = g;
                s.failed_starts = 0;
                s.respawn_at = None;
                s.delay = min;
                let old: Vec<Pid> = state
                    .workers
                    .iter()
                    .filter(|w| w.slot == slot && w.generation != g)
                    .map(|w| w.pid)
                    .collect();
                let old_alive = !old.is_empty();
                for pid in old {
                    drain(state, pid, StopReason::Replaced, now, out);
                }
                if !old_alive {
                    if slot + 1 >= n {
                        finish_reload(state, now, out);
                    } else if let Some(r) = &mut state.reload {
                        r.kind = ReloadKind::Rolling { slot: slot + 1 };
                        out.push(Action::Spawn {
                            slot: slot + 1,
                            generation: g,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    start_queued_reload(state, now, out);
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

/// Backoff alone never leaves a serving pool empty: when no worker is alive and every
/// slot is waiting for its refill, the earliest refill is due after the minimum delay.
fn keep_one_coming(state: &mut State, now: Instant, out: &[Action]) {
    if state.phase != Phase::Running || out.iter().any(|a| matches!(a, Action::Spawn { .. })) {
        return;
    }
    let alive = state.workers.iter().any(|w| {
        matches!(
            w.phase,
            WorkerPhase::Starting { .. } | WorkerPhase::Ready { .. }
        )
    });
    if alive {
        return;
    }
    let soon = now + state.cfg.restart.min;
    if let Some(s) = state
        .slots
        .iter_mut()
        .filter(|s| s.respawn_at.is_some())
        .min_by_key(|s| s.respawn_at)
        && s.respawn_at.is_some_and(|t| t > soon)
    {
        s.respawn_at = Some(soon);
    }
}

/// A memory sample came back: count, per worker, the samples in a row above the limit.
fn memory(state: &mut State, samples: &[(Pid, u64)]) {
    let Some(limit) = state.cfg.max_worker_memory else {
        return;
    };
    for &(pid, rss) in samples {
        if let Some(w) = state.worker_mut(pid) {
            w.rss = Some(rss);
            w.rss_over = if rss > limit { w.rss_over + 1 } else { 0 };
        }
    }
}

/// A number in 0..=1 from the seed and a worker's identity (splitmix64): its age limit
/// within the jitter. Pure, so the fake-clock tests are repeatable.
fn unit_interval(seed: u64, id: u64, pid: Pid) -> f64 {
    let mut z = seed ^ id.rotate_left(17) ^ u64::from(pid.as_raw().unsigned_abs());
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    #[allow(clippy::cast_precision_loss)]
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    u
}

/// Worker recycling (`--max-worker-memory`, `--max-worker-age`), one slot at a time, new
/// before old: arms the memory samples; drains the old worker once its replacement is
/// established; starts the replacement for the next worker due.
fn recycling(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    let sampling = matches!(state.phase, Phase::Starting | Phase::Running);
    match state.cfg.traffic_sample_every() {
        Some(every) if sampling => {
            if state.traffic_sample_at.is_none() {
                state.traffic_sample_at = Some(now + every);
            }
        }
        _ => state.traffic_sample_at = None,
    }
    let sampling = state.cfg.max_worker_memory.is_some()
        && matches!(state.phase, Phase::Starting | Phase::Running);
    if !sampling {
        state.memory_sample_at = None;
    } else if state.memory_sample_at.is_none() {
        state.memory_sample_at = Some(now + MEMORY_SAMPLE_EVERY);
    }
    if let Some(r) = state.recycle
        && let Some(new) = r.new
        && state
            .worker(new)
            .is_some_and(|w| w.established && matches!(w.phase, WorkerPhase::Ready { .. }))
    {
        state.recycle = None;
        state.recycle_delay = state.cfg.restart.min;
        let took = now.saturating_duration_since(r.started);
        if let Some(s) = state.slots.get_mut(r.slot as usize) {
            s.recycles += 1;
            s.last_recycle = Some((now, r.reason));
        }
        let tag = state.worker(new).map(Worker::tag);
        log(
            out,
            Level::INFO,
            tag,
            format!(
                "worker {} recycled: pid {new} serves, pid {} drains ({}; took {})",
                r.slot,
                r.old,
                r.reason.kind(),
                human(took)
            ),
        );
        drain(state, r.old, StopReason::Recycled, now, out);
    }
    if !state.may_recycle() {
        return;
    }
    let limit = state.cfg.max_worker_memory;
    let due = state
        .workers
        .iter()
        .filter(|w| {
            matches!(w.phase, WorkerPhase::Ready { .. }) && w.established && state.is_current(w)
        })
        .filter_map(|w| {
            if let (Some(limit), Some(rss)) = (limit, w.rss)
                && w.rss_over >= MEMORY_SAMPLES
            {
                // Memory first: it is the urgent one.
                return Some((0, w.started, w, RecycleReason::Memory { rss, limit }));
            }
            let at = w.recycle_at.filter(|t| *t <= now)?;
            let reason = RecycleReason::Age {
                age: now.saturating_duration_since(w.started),
                limit: at.saturating_duration_since(w.started),
            };
            Some((1, at, w, reason))
        })
        .min_by_key(|(rank, at, w, _)| (*rank, *at, w.slot));
    let Some((_, _, w, reason)) = due else {
        return;
    };
    let r = Recycle {
        slot: w.slot,
        generation: w.generation,
        old: w.pid,
        new: None,
        reason,
        started: now,
    };
    let age = now.saturating_duration_since(w.started);
    // Over the limit within a few samples of its start: the limit is likely below what
    // the worker needs at all, and every replacement will be recycled again.
    let (level, hint) = match reason {
        RecycleReason::Memory { .. } if age < MEMORY_SAMPLE_EVERY * 6 => (
            Level::WARN,
            format!(
                " (it is only {} old: if --max-worker-memory is below what a fresh worker \
                 needs, every replacement is recycled again)",
                human(age)
            ),
        ),
        _ => (Level::INFO, String::new()),
    };
    log(
        out,
        level,
        Some(w.tag()),
        format!(
            "recycling worker {} (pid {}): {reason}{hint}; starting its replacement",
            r.slot, r.old
        ),
    );
    state.recycle = Some(r);
    out.push(Action::Spawn {
        slot: r.slot,
        generation: r.generation,
    });
}

/// The replacement of a recycling slot failed: the old worker keeps serving (or, if it died
/// meanwhile, the slot is refilled), and recycling is tried again after a backoff.
fn recycle_failed(state: &mut State, why: &str, now: Instant, out: &mut Vec<Action>) {
    let Some(r) = state.recycle.take() else {
        return;
    };
    let delay = state.recycle_delay;
    let restart = state.cfg.restart;
    state.recycle_delay = (delay * 2).clamp(restart.min, restart.max);
    state.recycle_retry_at = Some(now + delay);
    let old_alive = state.live_in(r.generation, r.slot).is_some();
    let t = Some(WorkerTag {
        slot: r.slot,
        generation: r.generation,
        pid: r.new,
    });
    let keeps = if old_alive {
        format!("pid {} keeps serving", r.old)
    } else {
        format!("pid {} is gone too", r.old)
    };
    log(
        out,
        Level::WARN,
        t,
        format!(
            "replacement for recycling worker {} {why}: {keeps}; recycling again in {}",
            r.slot,
            human(delay)
        ),
    );
    if !old_alive
        && state.phase == Phase::Running
        && state
            .slots
            .get(r.slot as usize)
            .is_some_and(|s| s.generation == r.generation && s.respawn_at.is_none())
    {
        schedule_respawn(state, r.slot, Refill::Now, now, out);
    }
}

/// Stops a recycle in progress (its replacement, unless it already took over, is
/// drained; the old worker stays).
fn cancel_recycle(state: &mut State, why: &str, now: Instant, out: &mut Vec<Action>) {
    let Some(r) = state.recycle.take() else {
        return;
    };
    log(
        out,
        Level::INFO,
        None,
        format!("recycle of worker {} cancelled: {why}", r.slot),
    );
    if let Some(new) = r.new {
        drain(state, new, StopReason::RecycleCancelled, now, out);
    }
}

#[cfg(test)]
mod tests;
