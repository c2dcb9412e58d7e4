//! What a tick fires: every deadline in `State` that has passed (ready timeouts, drains,
//! watchdogs, backoff, the accept probe, recycling, idleness, systemd's watchdog and reload
//! timeout, traffic and memory samples).

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn tick(state: &mut State, now: Instant, out: &mut Vec<Action>) {
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
            // One report, for the newest silent generation (that covers the older ones).
            && silent.as_ref().is_none_or(|s: &Worker| s.generation < w.generation)
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
pub(super) fn arm_watchdog(state: &mut State, now: Instant) {
    state.watchdog_ping_at = state.cfg.systemd_watchdog.map(|_| now);
}

/// The periodic work fired by a tick: systemd's watchdog, its reload timeout, traffic
/// samples.
pub(super) fn housekeeping(state: &mut State, now: Instant, out: &mut Vec<Action>) {
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
