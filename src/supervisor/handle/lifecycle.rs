//! A worker's life: spawned, ready, established (up `--min-uptime` after ready), exited;
//! restart backoff and giving up; stopping one worker (drain, kill) or all of them; the
//! check that a serving generation accepts connections.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Should a worker of `generation` be started in `slot` now? Not stopping, the slot exists
/// and runs (or is being moved to) `generation`, and has no live worker of it yet.
pub(super) fn needs_worker(state: &State, slot: u32, generation: u32) -> bool {
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

pub(super) fn spawned(
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
pub(super) fn spawn_failed(
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
pub(super) enum Refill {
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
pub(super) fn failed_start(
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

pub(super) fn schedule_respawn(
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
pub(super) fn ready_hint(state: &State) -> &'static str {
    if state.cfg.ready == ReadyMode::Notify && !state.ready_seen {
        " (no READY=1 arrived on its NOTIFY_SOCKET: for a server without sd_notify support \
         use --ready after:DUR, ready DUR after start, or --ready exec, ready at once)"
    } else {
        ""
    }
}

pub(super) fn exited(
    state: &mut State,
    pid: Pid,
    how: ExitKind,
    now: Instant,
    out: &mut Vec<Action>,
) {
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

pub(super) fn notified(
    state: &mut State,
    pid: Pid,
    msg: &NotifyMsg,
    now: Instant,
    out: &mut Vec<Action>,
) {
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
pub(super) fn watchdog_miss(
    state: &mut State,
    pid: Pid,
    why: &str,
    now: Instant,
    out: &mut Vec<Action>,
) {
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

pub(super) fn mark_ready(state: &mut State, pid: Pid, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn establish(state: &mut State, pid: Pid, now: Instant) {
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
pub(super) fn arm_accept_probe(state: &mut State, now: Instant) {
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
pub(super) fn backlog(
    state: &mut State,
    found: Option<Backlog>,
    now: Instant,
    out: &mut Vec<Action>,
) {
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
pub(super) fn drain(
    state: &mut State,
    pid: Pid,
    reason: StopReason,
    now: Instant,
    out: &mut Vec<Action>,
) {
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
pub(super) fn kill_now(state: &mut State, pid: Pid, reason: StopReason, out: &mut Vec<Action>) {
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
pub(super) fn kill_all(state: &mut State, code: u8, out: &mut Vec<Action>) {
    let pids: Vec<Pid> = state.workers.iter().map(|w| w.pid).collect();
    for pid in pids {
        kill_now(state, pid, StopReason::Shutdown, out);
    }
    state.phase = Phase::Stopping {
        force_at: None,
        code,
    };
}

pub(super) fn stop(state: &mut State, code: u8, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn abort(
    state: &mut State,
    code: u8,
    reason: String,
    now: Instant,
    out: &mut Vec<Action>,
) {
    log(out, Level::ERROR, None, reason.clone());
    stop(state, code, now, out);
    out.push(Action::Notify(vec![Upstream::Status(reason.clone())]));
    state.last_status = reason;
}

/// Backoff alone never leaves a serving pool empty: when no worker is alive and every
/// slot is waiting for its refill, the earliest refill is due after the minimum delay.
pub(super) fn keep_one_coming(state: &mut State, now: Instant, out: &[Action]) {
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
