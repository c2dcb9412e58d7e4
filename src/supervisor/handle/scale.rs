//! The pool's size and its workers' turnover: `scale`, traffic and idleness
//! (`--exit-idle-after`, `--lazy`), and recycling (`--max-worker-memory`,
//! `--max-worker-age`), one slot at a time, new before old.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A traffic sample: remember activity; a lazy supervisor starts its workers.
pub(super) fn traffic(state: &mut State, busy: bool, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn idle_timeout(state: &mut State, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn scale(
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
            let mut s = crate::supervisor::state::Slot::new(&state.cfg);
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

/// A memory sample came back: count, per worker, the samples in a row above the limit.
pub(super) fn memory(state: &mut State, samples: &[(Pid, u64)]) {
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
pub(super) fn unit_interval(seed: u64, id: u64, pid: Pid) -> f64 {
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
pub(super) fn recycling(state: &mut State, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn recycle_failed(state: &mut State, why: &str, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn cancel_recycle(state: &mut State, why: &str, now: Instant, out: &mut Vec<Action>) {
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
