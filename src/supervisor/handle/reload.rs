//! Reloads: requested (coalesced while one runs), started (surge: a whole new generation;
//! rolling: one slot at a time, new before old), settled (`settle_reload`: the new
//! generation takes over, the old one drains), or rolled back.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn request_reload(
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
pub(super) fn start_queued_reload(state: &mut State, now: Instant, out: &mut Vec<Action>) {
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
pub(super) fn rollback(state: &mut State, reason: &str, now: Instant, out: &mut Vec<Action>) {
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

pub(super) fn finish_reload(state: &mut State, now: Instant, out: &mut Vec<Action>) {
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

/// The reload step: once the generation being rolled out is ready and established where
/// it should be (every slot for a surge, the current slot for a rolling restart), it takes
/// over those slots and the old workers are drained; a rolling restart moves on to the
/// next slot once the old worker of this one is gone. Called after every event.
pub(super) fn settle_reload(state: &mut State, now: Instant, out: &mut Vec<Action>) {
    let n = state.desired();
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
}
