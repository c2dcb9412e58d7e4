//! The state machine with a fake clock and fake pids: every path of start, crash, backoff,
//! stop, reload, rollback, coalescing and rolling restart, including the exact datagrams
//! sent upstream.

use super::*;
use crate::config::RestartDelay;
use crate::supervisor::state::Config;

const MS: Duration = Duration::from_millis(1);

struct Sim {
    st: State,
    now: Instant,
    next_pid: i32,
    log: Vec<Action>,
    /// At most this many generations alive at once (2, but see the rolling-failure test).
    max_generations: usize,
    /// What `ProbeAccepting` finds (`None`: the sockets cannot be seen).
    backlog: Option<Backlog>,
    /// What `SampleMemory` finds, per pid (others: unreadable).
    rss: std::collections::HashMap<Pid, u64>,
}

fn cfg(workers: u32) -> Config {
    Config {
        workers,
        ready: ReadyMode::Notify,
        ready_timeout: Duration::from_secs(60),
        restart: RestartDelay::default(),
        stop_signal: Signal::SIGTERM,
        stop_timeout: Duration::from_secs(30),
        worker_watchdog: None,
        exit_idle_after: None,
        lazy: false,
        min_uptime: Duration::ZERO,
        max_worker_memory: None,
        max_worker_age: None,
        rolling: false,
        systemd_watchdog: None,
    }
}

impl Sim {
    fn new(cfg: Config) -> Sim {
        let mut s = Sim {
            st: State::new(cfg),
            now: Instant::now(),
            next_pid: 100,
            log: Vec::new(),
            max_generations: 2,
            backlog: None,
            rss: std::collections::HashMap::new(),
        };
        s.ev(Event::Start);
        s
    }

    /// Handles an event; Spawn actions succeed with fresh pids (like the executor does).
    fn ev(&mut self, e: Event) -> Vec<Action> {
        let mut all = Vec::new();
        let mut queue = vec![e];
        while let Some(e) = queue.pop() {
            for a in handle(&mut self.st, e, self.now) {
                if a == Action::ProbeAccepting {
                    queue.insert(0, Event::Backlog(self.backlog));
                }
                if a == Action::SampleMemory {
                    let found = self
                        .st
                        .workers
                        .iter()
                        .filter_map(|w| self.rss.get(&w.pid).map(|r| (w.pid, *r)))
                        .collect();
                    queue.insert(0, Event::Memory(found));
                }
                if let Action::Spawn { slot, generation } = a {
                    self.next_pid += 1;
                    queue.insert(
                        0,
                        Event::Spawned {
                            slot,
                            generation,
                            pid: Pid::from_raw(self.next_pid),
                        },
                    );
                }
                all.push(a);
            }
            self.check_invariants();
        }
        self.log.extend(all.iter().cloned());
        all
    }

    /// The accept-queue probe finds the sockets invisible and stops (as in a sandbox
    /// without netlink): for tests about other deadlines.
    fn blind(&mut self) {
        self.ev(Event::Backlog(None));
        assert_eq!(self.st.accept_probe, None);
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.ev(Event::Tick)
    }

    fn pids(&self, generation: u32) -> Vec<Pid> {
        let mut v: Vec<_> = self
            .st
            .workers
            .iter()
            .filter(|w| w.generation == generation)
            .map(|w| (w.slot, w.pid))
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    fn ready(&mut self, pid: Pid) -> Vec<Action> {
        let msg = NotifyMsg {
            ready: true,
            ..NotifyMsg::default()
        };
        self.ev(Event::Notify { pid, msg })
    }

    fn ready_gen(&mut self, generation: u32) -> Vec<Action> {
        let mut all = Vec::new();
        for p in self.pids(generation) {
            all.extend(self.ready(p));
        }
        all
    }

    fn exit(&mut self, pid: Pid, code: i32) -> Vec<Action> {
        self.ev(Event::Exited {
            pid,
            how: ExitKind::Code(code),
        })
    }

    fn check_invariants(&self) {
        let mut gens: Vec<u32> = self.st.workers.iter().map(|w| w.generation).collect();
        gens.sort_unstable();
        gens.dedup();
        assert!(
            gens.len() <= self.max_generations,
            "too many generations alive: {gens:?}"
        );
    }
}

fn spawns(a: &[Action]) -> Vec<(u32, u32)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Spawn { slot, generation } => Some((*slot, *generation)),
            _ => None,
        })
        .collect()
}

fn kills(a: &[Action]) -> Vec<(Pid, Signal, bool)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Kill { pid, signal, group } => Some((*pid, *signal, *group)),
            _ => None,
        })
        .collect()
}

fn upstream(a: &[Action]) -> Vec<Vec<Upstream>> {
    a.iter()
        .filter_map(|a| match a {
            Action::Notify(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn has_upstream(a: &[Action], m: &Upstream) -> bool {
    upstream(a).iter().any(|d| d.contains(m))
}

fn exit_code(a: &[Action]) -> Option<u8> {
    a.iter().find_map(|a| match a {
        Action::Exit { code } => Some(*code),
        _ => None,
    })
}

fn reload_results(a: &[Action]) -> Vec<(Vec<Ticket>, Result<u32, String>)> {
    a.iter()
        .filter_map(|a| match a {
            Action::ReloadFinished { tickets, result } => Some((tickets.clone(), result.clone())),
            _ => None,
        })
        .collect()
}

fn status(a: &[Action]) -> Option<String> {
    upstream(a)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Upstream::Status(s) => Some(s),
            _ => None,
        })
        .next_back()
}

#[test]
fn start_spawns_all_and_is_ready_only_when_all_are() {
    let mut s = Sim::new(cfg(3));
    assert_eq!(spawns(&s.log), [(0, 1), (1, 1), (2, 1)]);
    let p = s.pids(1);
    let a = s.ready(p[0]);
    assert!(!has_upstream(&a, &Upstream::Ready));
    assert_eq!(status(&a).as_deref(), Some("starting: 1/3 workers ready"));
    s.ready(p[1]);
    let a = s.ready(p[2]);
    assert!(has_upstream(&a, &Upstream::Ready));
    assert_eq!(
        status(&a).as_deref(),
        Some("3/3 workers ready, generation 1")
    );
    assert_eq!(s.st.phase, Phase::Running);
    // Only the check that the workers accept connections is armed...
    assert_eq!(s.st.next_deadline(), Some(s.now + ACCEPT_PROBE_FIRST));
    s.ev(Event::Backlog(Some(Backlog {
        accepting: true,
        ..Backlog::default()
    })));
    // ... and once they are seen accepting, nothing: the executor sleeps without a timeout.
    assert_eq!(s.st.next_deadline(), None);
    // READY=1 is sent exactly once.
    let a = s.ready(p[2]);
    assert!(!has_upstream(&a, &Upstream::Ready));
}

#[test]
fn worker_status_text_is_kept_and_strangers_are_ignored() {
    let mut s = Sim::new(cfg(1));
    let p = s.pids(1)[0];
    let msg = NotifyMsg {
        status: Some("warming up".into()),
        ..NotifyMsg::default()
    };
    s.ev(Event::Notify { pid: p, msg });
    assert_eq!(
        s.st.worker(p).unwrap().status.as_deref(),
        Some("warming up")
    );
    let a = s.ready(Pid::from_raw(999_999));
    assert!(a.is_empty() || status(&a).is_none());
    assert_eq!(s.st.phase, Phase::Starting);
}

#[test]
fn crashed_worker_is_replaced_at_once_and_a_crash_at_boot_backs_off() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    s.blind();
    // A worker that started and later died is replaced at once: backoff is for crash
    // loops at boot, and waiting would only shrink the pool.
    let victim = s.pids(1)[1];
    s.now += Duration::from_secs(1);
    let a = s.exit(victim, 1);
    assert_eq!(spawns(&a), [(1, 1)]);
    // Its replacement crashing before READY=1 backs off, doubling each time.
    for want in [100, 200, 400, 800] {
        let victim = s.pids(1)[1];
        s.now += Duration::from_secs(1);
        let a = s.exit(victim, 1);
        assert!(s.st.status_line().starts_with("1/2 workers ready"));
        assert!(spawns(&a).is_empty(), "refill waits for the backoff");
        assert_eq!(s.st.next_deadline(), Some(s.now + want * MS));
        let a = s.advance((want * MS).checked_sub(MS).unwrap());
        assert!(spawns(&a).is_empty(), "not before the delay ({want}ms)");
        let a = s.advance(MS);
        assert_eq!(spawns(&a), [(1, 1)], "slot 1 refilled after {want}ms");
    }
    assert_eq!(s.st.slots[1].restarts, 5);
    assert_eq!(s.st.phase, Phase::Running, "slot 0 serves: no giving up");
    // Once a worker of the slot started, its backoff starts over.
    let new = s.pids(1)[1];
    s.ready(new);
    s.now += Duration::from_secs(1);
    let a = s.exit(new, 1);
    assert_eq!(spawns(&a), [(1, 1)]);
    let victim = s.pids(1)[1];
    s.exit(victim, 1);
    assert_eq!(s.st.next_deadline(), Some(s.now + 100 * MS));
    // The backoff is capped at the maximum.
    let mut s = Sim::new(Config {
        restart: "1s..3s".parse().unwrap(),
        ..cfg(2)
    });
    s.ready_gen(1);
    s.blind();
    let victim = s.pids(1)[1];
    s.exit(victim, 1);
    for want in [1, 2, 3, 3] {
        let victim = s.pids(1)[1];
        s.exit(victim, 1);
        assert_eq!(
            s.st.next_deadline(),
            Some(s.now + Duration::from_secs(want))
        );
        s.advance(Duration::from_secs(want));
    }
}

#[test]
fn crash_at_boot_gives_up_with_failure() {
    let mut s = Sim::new(cfg(2));
    let ok = s.pids(1)[0];
    s.ready(ok);
    for attempt in 1..=START_ATTEMPTS {
        let bad = s.pids(1)[1];
        let a = s.exit(bad, 3);
        if attempt < START_ATTEMPTS {
            s.advance(s.st.next_deadline().unwrap() - s.now);
        } else {
            assert!(has_upstream(&a, &Upstream::Stopping));
            assert!(kills(&a).contains(&(ok, Signal::SIGTERM, false)));
            let st = status(&a).unwrap();
            assert!(
                st.contains("failed to start 3 times") && st.contains("exit code 3"),
                "{st}"
            );
        }
    }
    let a = s.exit(ok, 0);
    assert_eq!(exit_code(&a), Some(exit::FAILURE));
}

#[test]
fn unexecutable_command_is_a_configuration_error() {
    let mut st = State::new(cfg(2));
    let a = handle(&mut st, Event::Start, Instant::now());
    assert_eq!(spawns(&a).len(), 2);
    let a = handle(
        &mut st,
        Event::SpawnFailed {
            slot: 0,
            generation: 1,
            error: "/x: No such file".into(),
            permanent: true,
        },
        Instant::now(),
    );
    assert_eq!(exit_code(&a), Some(exit::CONFIG));
}

#[test]
fn not_ready_in_time_is_killed_and_counts_as_failed_start() {
    let mut s = Sim::new(Config {
        ready_timeout: Duration::from_secs(5),
        ..cfg(1)
    });
    let p = s.pids(1)[0];
    let a = s.advance(Duration::from_secs(5));
    assert_eq!(kills(&a), [(p, Signal::SIGKILL, true)]);
    s.ev(Event::Exited {
        pid: p,
        how: ExitKind::Signal(9),
    });
    assert_eq!(s.st.slots[0].failed_starts, 1);
    let a = s.advance(100 * MS);
    assert_eq!(spawns(&a), [(0, 1)]);
}

#[test]
fn ready_modes_exec_and_after() {
    let s = Sim::new(Config {
        ready: ReadyMode::Exec,
        ..cfg(2)
    });
    assert_eq!(s.st.phase, Phase::Running);
    assert!(has_upstream(&s.log, &Upstream::Ready));
    let mut s = Sim::new(Config {
        ready: ReadyMode::After(Duration::from_secs(2)),
        ..cfg(2)
    });
    assert_eq!(s.st.phase, Phase::Starting);
    let a = s.advance(Duration::from_secs(2));
    assert!(has_upstream(&a, &Upstream::Ready));
}

#[test]
fn stop_drains_then_kills_then_exits_zero() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    let p = s.pids(1);
    let a = s.ev(Event::Stop);
    assert_eq!(
        upstream(&a),
        [vec![
            Upstream::Stopping,
            Upstream::Status("stopping: 2 worker(s) left".into())
        ]],
        "one datagram"
    );
    assert_eq!(
        kills(&a),
        [
            (p[0], Signal::SIGTERM, false),
            (p[1], Signal::SIGTERM, false)
        ]
    );
    let a = s.exit(p[0], 0);
    assert!(exit_code(&a).is_none());
    assert!(spawns(&a).is_empty(), "no refill while stopping");
    let a = s.advance(Duration::from_secs(30));
    assert_eq!(kills(&a), [(p[1], Signal::SIGKILL, true)]);
    assert_eq!(s.st.next_deadline(), None, "no deadline left to spin on");
    let a = s.ev(Event::Exited {
        pid: p[1],
        how: ExitKind::Signal(9),
    });
    assert_eq!(exit_code(&a), Some(exit::OK));
}

#[test]
fn second_stop_kills_at_once() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    s.ev(Event::Stop);
    let a = s.ev(Event::Stop);
    assert_eq!(kills(&a).len(), 2);
    assert!(kills(&a).iter().all(|k| k.1 == Signal::SIGKILL && k.2));
}

#[test]
fn stop_with_no_workers_exits_immediately() {
    let mut s = Sim::new(cfg(1));
    let p = s.pids(1)[0];
    s.exit(p, 1); // waiting for backoff, no worker alive
    let a = s.ev(Event::Stop);
    assert_eq!(exit_code(&a), Some(exit::OK));
}

#[test]
fn surge_reload_starts_new_generation_and_drains_old_when_all_ready() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    let old = s.pids(1);
    let a = s.ev(Event::Reload {
        ticket: Some(7),
        wait: true,
    });
    // One datagram: RELOADING=1 (MONOTONIC_USEC= is added to it when sent) and the STATUS.
    assert_eq!(
        upstream(&a),
        [vec![
            Upstream::Reloading,
            Upstream::Status(
                "reloading to generation 2: 0/2 new workers ready; 2/2 serving".into()
            )
        ]]
    );
    assert_eq!(spawns(&a), [(0, 2), (1, 2)]);
    let new = s.pids(2);
    let a = s.ready(new[0]);
    assert!(
        kills(&a).is_empty(),
        "old generation serves until every new worker is ready"
    );
    let a = s.ready(new[1]);
    assert_eq!(
        kills(&a),
        [
            (old[0], Signal::SIGTERM, false),
            (old[1], Signal::SIGTERM, false)
        ]
    );
    assert!(has_upstream(&a, &Upstream::Ready));
    assert_eq!(reload_results(&a), [(vec![7], Ok(2))]);
    assert_eq!(
        status(&a).as_deref(),
        Some("2/2 workers ready, generation 2")
    );
    // Old workers exiting now is expected: no refill.
    let a = s.exit(old[0], 0);
    assert!(spawns(&a).is_empty());
    // A crash in the new generation is refilled with the new generation, at once.
    s.exit(old[1], 0);
    let a = s.exit(new[1], 1);
    assert_eq!(spawns(&a), [(1, 2)]);
}

#[test]
fn failed_new_generation_is_rolled_back() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    let old = s.pids(1);
    s.ev(Event::Reload {
        ticket: Some(1),
        wait: true,
    });
    let new = s.pids(2);
    s.ready(new[0]);
    let a = s.exit(new[1], 3);
    assert_eq!(
        kills(&a),
        [(new[0], Signal::SIGTERM, false)],
        "only the new generation stops"
    );
    let results = reload_results(&a);
    assert_eq!(results.len(), 1);
    let err = results[0].1.clone().unwrap_err();
    assert!(
        err.contains("generation 2") && err.contains("exit code 3"),
        "{err}"
    );
    assert!(has_upstream(&a, &Upstream::Ready));
    assert!(status(&a).unwrap().contains("failed"));
    assert!(
        s.st.workers
            .iter()
            .filter(|w| w.generation == 1)
            .all(|w| matches!(w.phase, WorkerPhase::Ready { .. }))
    );
    assert_eq!(s.pids(1), old);
    // The rolled-back worker exiting is not refilled; the old generation still serves.
    let a = s.exit(new[0], 0);
    assert!(spawns(&a).is_empty());
    assert_eq!(s.st.serving_generation, 1);
    // A later reload gets a fresh generation number.
    let a = s.ev(Event::Reload {
        ticket: None,
        wait: true,
    });
    assert_eq!(spawns(&a), [(0, 3), (1, 3)]);
}

#[test]
fn reload_rolls_back_when_new_worker_is_not_ready_in_time() {
    let mut s = Sim::new(Config {
        ready_timeout: Duration::from_secs(5),
        ..cfg(1)
    });
    s.ready_gen(1);
    s.ev(Event::Reload {
        ticket: Some(3),
        wait: true,
    });
    let new = s.pids(2)[0];
    let a = s.advance(Duration::from_secs(5));
    assert_eq!(kills(&a), [(new, Signal::SIGKILL, true)]);
    assert!(
        reload_results(&a)[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("not ready within 5s")
    );
    let a = s.ev(Event::Exited {
        pid: new,
        how: ExitKind::Signal(9),
    });
    assert!(spawns(&a).is_empty());
}

#[test]
fn reloads_during_a_reload_are_coalesced_into_one() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    s.ev(Event::Reload {
        ticket: Some(1),
        wait: true,
    });
    let a = s.ev(Event::Reload {
        ticket: Some(2),
        wait: true,
    });
    assert!(spawns(&a).is_empty());
    s.ev(Event::Reload {
        ticket: Some(3),
        wait: true,
    });
    let a = s.ready_gen(2);
    assert_eq!(reload_results(&a), [(vec![1], Ok(2))]);
    assert!(
        spawns(&a).is_empty(),
        "waits until the old generation is gone"
    );
    for p in s.pids(1) {
        s.exit(p, 0);
    }
    assert_eq!(s.st.reload.as_ref().map(|r| r.generation), Some(3));
    let a = s.ready_gen(3);
    assert_eq!(reload_results(&a), [(vec![2, 3], Ok(3))]);
    for p in s.pids(2) {
        s.exit(p, 0);
    }
    assert!(s.st.reload.is_none() && s.st.queued.is_none());
}

#[test]
fn reload_before_first_generation_is_ready_waits() {
    let mut s = Sim::new(cfg(1));
    let a = s.ev(Event::Reload {
        ticket: Some(9),
        wait: true,
    });
    assert!(spawns(&a).is_empty());
    let a = s.ready_gen(1);
    assert_eq!(spawns(&a), [(0, 2)]);
}

#[test]
fn stop_during_reload_fails_the_reload() {
    let mut s = Sim::new(cfg(1));
    s.ready_gen(1);
    s.ev(Event::Reload {
        ticket: Some(4),
        wait: true,
    });
    let a = s.ev(Event::Stop);
    assert_eq!(reload_results(&a)[0].0, [4]);
    assert!(reload_results(&a)[0].1.is_err());
    assert_eq!(kills(&a).len(), 2);
}

#[test]
fn rolling_restart_replaces_one_slot_at_a_time() {
    let mut s = Sim::new(cfg(3));
    s.ready_gen(1);
    let old = s.pids(1);
    let a = s.ev(Event::RollingRestart {
        ticket: Some(5),
        wait: true,
    });
    assert_eq!(spawns(&a), [(0, 2)]);
    for slot in 0..3 {
        assert!(s.st.workers.len() <= 4, "at most N+1 workers");
        let new = s.st.live_in(2, slot).unwrap().pid;
        let a = s.ready(new);
        assert_eq!(kills(&a), [(old[slot as usize], Signal::SIGTERM, false)]);
        assert!(
            spawns(&a).is_empty(),
            "next slot only after the old worker is gone"
        );
        let a = s.exit(old[slot as usize], 0);
        if slot < 2 {
            assert_eq!(spawns(&a), [(slot + 1, 2)]);
        } else {
            assert_eq!(reload_results(&a), [(vec![5], Ok(2))]);
            assert!(has_upstream(&a, &Upstream::Ready));
        }
    }
    assert_eq!(s.st.serving_generation, 2);
}

#[test]
fn failed_rolling_restart_stops_and_keeps_the_old_worker() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    let old = s.pids(1);
    s.ev(Event::RollingRestart {
        ticket: None,
        wait: true,
    });
    let n0 = s.st.live_in(2, 0).unwrap().pid;
    s.ready(n0);
    s.exit(old[0], 0);
    let n1 = s.st.live_in(2, 1).unwrap().pid;
    let a = s.exit(n1, 1);
    assert!(reload_results(&a)[0].1.is_err());
    assert!(s.st.live_in(1, 1).is_some(), "slot 1 keeps its old worker");
    assert!(
        s.st.live_in(2, 0).is_some(),
        "slot 0 keeps its healthy new worker"
    );
    // The old worker of slot 1 is still refilled as generation 1 if it crashes.
    let a = s.exit(old[1], 1);
    assert_eq!(spawns(&a), [(1, 1)]);
}

#[test]
fn spawn_result_for_a_rolled_back_generation_is_killed() {
    let mut st = State::new(cfg(2));
    let t = Instant::now();
    handle(&mut st, Event::Start, t);
    for (slot, pid) in [(0, 10), (1, 11)] {
        handle(
            &mut st,
            Event::Spawned {
                slot,
                generation: 1,
                pid: Pid::from_raw(pid),
            },
            t,
        );
    }
    for pid in [10, 11] {
        handle(
            &mut st,
            Event::Notify {
                pid: Pid::from_raw(pid),
                msg: NotifyMsg {
                    ready: true,
                    ..NotifyMsg::default()
                },
            },
            t,
        );
    }
    let a = handle(
        &mut st,
        Event::Reload {
            ticket: None,
            wait: true,
        },
        t,
    );
    assert_eq!(spawns(&a), [(0, 2), (1, 2)]);
    // The first new spawn fails: rollback. The second Spawn of the batch still runs.
    handle(
        &mut st,
        Event::SpawnFailed {
            slot: 0,
            generation: 2,
            error: "boom".into(),
            permanent: false,
        },
        t,
    );
    let a = handle(
        &mut st,
        Event::Spawned {
            slot: 1,
            generation: 2,
            pid: Pid::from_raw(12),
        },
        t,
    );
    assert_eq!(kills(&a), [(Pid::from_raw(12), Signal::SIGKILL, true)]);
}

#[test]
fn scale_up_starts_new_slots_and_scale_down_drains_the_highest() {
    let mut s = Sim::new(cfg(2));
    s.ready_gen(1);
    let a = s.ev(Event::Scale {
        workers: 4,
        ticket: None,
    });
    assert_eq!(spawns(&a), [(2, 1), (3, 1)]);
    assert!(status(&a).unwrap().starts_with("2/4 workers ready"));
    let a = s.ready_gen(1);
    assert!(status(&a).unwrap().starts_with("4/4 workers ready"));
    let p = s.pids(1);
    let a = s.ev(Event::Scale {
        workers: 1,
        ticket: None,
    });
    assert_eq!(
        kills(&a),
        [
            (p[1], Signal::SIGTERM, false),
            (p[2], Signal::SIGTERM, false),
            (p[3], Signal::SIGTERM, false)
        ]
    );
    assert!(status(&a).unwrap().starts_with("1/1 workers ready"));
    let a = s.exit(p[3], 0);
    assert!(spawns(&a).is_empty(), "a scaled-down slot is not refilled");
    // The new count survives a reload.
    let a = s.ev(Event::Reload {
        ticket: None,
        wait: true,
    });
    assert!(spawns(&a).is_empty(), "waits for the drained workers");
    s.exit(p[1], 0);
    let a = s.exit(p[2], 0);
    assert_eq!(spawns(&a), [(0, 2)]);
}

#[test]
fn worker_that_stops_pinging_gets_sigabrt_and_is_replaced() {
    let wd = Duration::from_secs(2);
    let mut s = Sim::new(Config {
        worker_watchdog: Some(wd),
        ..cfg(2)
    });
    s.ready_gen(1);
    let p = s.pids(1);
    assert_eq!(s.st.next_deadline(), Some(s.now + wd));
    s.now += Duration::from_secs(1);
    let ping = NotifyMsg {
        watchdog: true,
        ..NotifyMsg::default()
    };
    s.ev(Event::Notify {
        pid: p[0],
        msg: ping,
    });
    let a = s.advance(Duration::from_secs(1));
    assert_eq!(
        kills(&a),
        [(p[1], Signal::SIGABRT, false)],
        "only the silent worker"
    );
    let a = s.advance(Duration::from_secs(30));
    assert!(
        kills(&a).contains(&(p[1], Signal::SIGKILL, true)),
        "SIGKILL after the grace"
    );
    let a = s.ev(Event::Exited {
        pid: p[1],
        how: ExitKind::Signal(9),
    });
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Log { message, .. } if message.contains("watchdog")))
    );
    assert_eq!(spawns(&a), [(1, 1)], "replaced like a crash");
}

#[test]
fn idle_supervisor_exits_cleanly_and_busy_one_stays() {
    let idle = Duration::from_secs(10);
    let mut s = Sim::new(Config {
        exit_idle_after: Some(idle),
        ..cfg(2)
    });
    s.ready_gen(1);
    s.blind();
    // The next traffic sample comes first, well before the idle deadline.
    assert_eq!(s.st.next_deadline(), Some(s.now + idle / 10));
    assert_eq!(s.st.last_busy, Some(s.now));
    // Traffic keeps pushing the deadline out.
    for _ in 0..5 {
        s.now += Duration::from_secs(6);
        s.ev(Event::Traffic { busy: true });
        let a = s.ev(Event::Tick);
        assert!(kills(&a).is_empty());
    }
    // An idle sample does not reset the clock.
    s.now += Duration::from_secs(6);
    s.ev(Event::Traffic { busy: false });
    let a = s.advance(Duration::from_secs(4));
    assert!(has_upstream(&a, &Upstream::Stopping));
    assert_eq!(kills(&a).len(), 2);
    for p in s.pids(1) {
        s.exit(p, 0);
    }
    assert_eq!(exit_code(&s.log), Some(exit::OK));
}

#[test]
fn lazy_supervisor_starts_on_traffic_and_goes_back_to_holding_the_sockets() {
    let mut s = Sim::new(Config {
        lazy: true,
        exit_idle_after: Some(Duration::from_secs(5)),
        ..cfg(2)
    });
    assert_eq!(s.st.phase, Phase::Idle);
    assert!(spawns(&s.log).is_empty());
    assert!(
        has_upstream(&s.log, &Upstream::Ready),
        "ready while holding the sockets"
    );
    let a = s.ev(Event::Traffic { busy: true });
    assert_eq!(spawns(&a), [(0, 1), (1, 1)]);
    let a = s.ready_gen(1);
    assert!(
        !has_upstream(&a, &Upstream::Ready),
        "READY=1 was sent once already"
    );
    let a = s.advance(Duration::from_secs(5));
    assert_eq!(kills(&a).len(), 2);
    assert_eq!(s.st.phase, Phase::Idle);
    assert!(exit_code(&a).is_none());
    for p in s.pids(1) {
        let a = s.exit(p, 0);
        assert!(spawns(&a).is_empty() && exit_code(&a).is_none());
    }
    let a = s.ev(Event::Traffic { busy: true });
    assert_eq!(
        spawns(&a),
        [(0, 2), (1, 2)],
        "a new generation serves the next connection"
    );
}

#[test]
fn reload_while_idle_succeeds_at_once() {
    let mut s = Sim::new(Config {
        lazy: true,
        ..cfg(2)
    });
    let a = s.ev(Event::Reload {
        ticket: Some(8),
        wait: true,
    });
    assert!(spawns(&a).is_empty());
    assert_eq!(reload_results(&a), [(vec![8], Ok(1))]);
    assert!(has_upstream(&a, &Upstream::Reloading) && has_upstream(&a, &Upstream::Ready));
    assert!(s.st.queued.is_none());
}

/// Regressions found in review, each named after the behaviour it now asserts.
mod regressions {
    use super::*;

    /// A reload that is waiting for something must have a deadline armed, or be done.
    fn assert_not_stuck(s: &Sim) {
        if s.st.reload.is_some() || s.st.queued.is_some() {
            assert!(
                s.st.next_deadline().is_some(),
                "reload pending but no deadline armed: the supervisor sleeps forever"
            );
        }
    }

    #[test]
    fn scale_during_a_surge_reload_is_refused_and_never_hangs_it() {
        let mut s = Sim::new(cfg(2));
        s.ready_gen(1);
        s.ev(Event::Reload {
            ticket: Some(1),
            wait: true,
        });
        // SIGHUP and a scale request in the same poll wake-up: handle() sees the reload
        // first, and refuses the scale.
        s.ev(Event::Scale {
            workers: 3,
            ticket: None,
        });
        s.ready_gen(2);
        s.ready_gen(1);
        assert_not_stuck(&s);
    }

    #[test]
    fn scale_down_during_a_rolling_restart_never_hangs_it() {
        let mut s = Sim::new(cfg(3));
        s.ready_gen(1);
        s.ev(Event::RollingRestart {
            ticket: Some(1),
            wait: true,
        });
        s.ready_gen(2); // slot 0 new ready; old slot-0 draining
        let old0 = s.pids(1)[0];
        s.exit(old0, 0); // rolling moves on to slot 1
        assert_eq!(
            s.st.reload.as_ref().unwrap().kind,
            ReloadKind::Rolling { slot: 1 }
        );
        s.ev(Event::Scale {
            workers: 1,
            ticket: None,
        }); // drains slot 1 and 2 (both generations)
        for p in
            s.st.workers
                .iter()
                .filter(|w| w.slot >= 1)
                .map(|w| w.pid)
                .collect::<Vec<_>>()
        {
            s.exit(p, 0);
        }
        assert_not_stuck(&s);
    }

    #[test]
    fn scale_up_while_lazy_idle_spawns_nothing() {
        let mut s = Sim::new(Config {
            lazy: true,
            exit_idle_after: Some(Duration::from_secs(5)),
            ..cfg(1)
        });
        let a = s.ev(Event::Scale {
            workers: 2,
            ticket: None,
        });
        assert!(spawns(&a).is_empty(), "spawned {:?} while idle", spawns(&a));
    }

    #[test]
    fn reload_after_scaling_while_idle_starts_at_once() {
        let mut s = Sim::new(Config {
            lazy: true,
            exit_idle_after: Some(Duration::from_secs(5)),
            ..cfg(1)
        });
        s.ev(Event::Traffic { busy: true }); // generation 1
        s.ready_gen(1);
        s.advance(Duration::from_secs(5)); // idle again
        for p in s.pids(1) {
            s.exit(p, 0);
        }
        s.ev(Event::Scale {
            workers: 2,
            ticket: None,
        }); // spawns slot 1, generation 1, while idle
        s.ready_gen(1);
        s.ev(Event::Traffic { busy: true }); // generation 2 in both slots
        s.ready_gen(2);
        assert_eq!(s.st.phase, Phase::Running);
        let a = s.ev(Event::Reload {
            ticket: Some(7),
            wait: true,
        });
        assert!(
            !spawns(&a).is_empty(),
            "reload queued forever: workers alive {:?}",
            s.st.workers
                .iter()
                .map(|w| (w.slot, w.generation, w.phase))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn watchdog_victim_exiting_after_lazy_idle_leaves_no_deadline_in_the_past() {
        let mut s = Sim::new(Config {
            lazy: true,
            exit_idle_after: Some(Duration::from_secs(5)),
            worker_watchdog: Some(Duration::from_secs(2)),
            ..cfg(1)
        });
        s.ev(Event::Traffic { busy: true });
        s.ready_gen(1);
        let p = s.pids(1)[0];
        s.advance(Duration::from_secs(3)); // missed watchdog: SIGABRT, Draining
        s.advance(Duration::from_secs(3)); // idle: phase Idle
        assert_eq!(s.st.phase, Phase::Idle);
        s.exit(p, 134);
        let d = s.st.next_deadline();
        s.advance(Duration::from_secs(10));
        assert!(
            s.st.next_deadline().is_none_or(|t| t > s.now),
            "deadline {d:?} stays in the past while idle: poll(0) busy loop"
        );
    }

    #[test]
    fn no_idle_deadline_in_the_past_while_a_coalesced_reload_waits_for_the_drain() {
        let mut s = Sim::new(Config {
            exit_idle_after: Some(Duration::from_secs(10)),
            ..cfg(1)
        });
        s.ready_gen(1);
        s.ev(Event::Reload {
            ticket: None,
            wait: true,
        });
        s.ready_gen(2); // generation 1 draining (30 s stop timeout)
        s.ev(Event::Reload {
            ticket: None,
            wait: true,
        }); // queued behind the drain
        s.advance(Duration::from_secs(11));
        assert!(
            s.st.next_deadline().is_none_or(|t| t > s.now),
            "next_deadline is in the past after the tick: the executor spins"
        );
    }

    #[test]
    fn second_stop_after_a_failed_start_keeps_the_failure_exit_code() {
        let mut s = Sim::new(cfg(2));
        let p = s.pids(1);
        s.ready(p[1]);
        s.exit(p[0], 1);
        for _ in 0..2 {
            s.advance(Duration::from_secs(31));
            let q = s.pids(1);
            let crashing = *q.iter().find(|x| **x != p[1]).unwrap();
            s.exit(crashing, 1);
        }
        assert!(matches!(s.st.phase, Phase::Stopping { code: 1, .. }));
        s.ev(Event::Stop); // e.g. systemd's start timeout, or Ctrl-C
        let a = s.exit(p[1], 0);
        assert_eq!(exit_code(&a), Some(exit::FAILURE));
    }

    #[test]
    fn worker_watchdog_is_armed_with_ready_exec() {
        let mut s = Sim::new(Config {
            ready: ReadyMode::Exec,
            worker_watchdog: Some(Duration::from_secs(2)),
            ..cfg(1)
        });
        let a = s.advance(Duration::from_secs(60));
        assert!(
            !kills(&a).is_empty(),
            "a worker that never pinged is never caught"
        );
    }

    #[test]
    fn reload_while_lazy_idle_with_draining_workers_is_answered() {
        let mut s = Sim::new(Config {
            lazy: true,
            exit_idle_after: Some(Duration::from_secs(5)),
            ..cfg(1)
        });
        s.ev(Event::Traffic { busy: true });
        s.ready_gen(1);
        s.advance(Duration::from_secs(5)); // idle: draining
        let a = s.ev(Event::Reload {
            ticket: Some(3),
            wait: true,
        });
        let mut all = a;
        for p in s.pids(1) {
            all.extend(s.exit(p, 0));
        }
        all.extend(s.advance(Duration::from_secs(600)));
        assert!(!reload_results(&all).is_empty(), "ticket 3 never answered");
    }

    #[test]
    fn failed_rolling_restart_then_reload_replaces_the_mixed_slots() {
        let mut s = Sim::new(cfg(2));
        s.max_generations = 3; // documented: after a failed rolling restart slots are mixed
        s.ready_gen(1);
        s.ev(Event::RollingRestart {
            ticket: None,
            wait: true,
        });
        s.ready_gen(2);
        s.exit(s.pids(1)[0], 0); // slot 0 replaced; slot 1's new worker starts
        let new1 = *s.pids(2).last().unwrap();
        s.exit(new1, 1); // stopped: slot 0 runs gen 2, slot 1 still gen 1
        let a = s.ev(Event::Reload {
            ticket: Some(1),
            wait: true,
        });
        assert_eq!(spawns(&a), [(0, 3), (1, 3)]);
        let a = s.ready_gen(3);
        assert_eq!(reload_results(&a), [(vec![1], Ok(3))]);
        assert!(s.st.slots.iter().all(|sl| sl.generation == 3));
    }
}

/// Crashes, backoff, minimum uptime and readiness that neither lies nor hangs (issues 10,
/// 11, 12).
mod policy {
    use super::*;

    fn with_min_uptime(workers: u32, min_uptime: Duration) -> Config {
        Config {
            min_uptime,
            ..cfg(workers)
        }
    }

    fn logs(a: &[Action], level: Level) -> Vec<String> {
        a.iter()
            .filter_map(|a| match a {
                Action::Log {
                    level: l, message, ..
                } if *l == level => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn answers(a: &[Action]) -> Vec<(Ticket, Result<String, String>)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Answer { ticket, result } => Some((*ticket, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn live(s: &Sim) -> usize {
        s.st.workers
            .iter()
            .filter(|w| {
                matches!(
                    w.phase,
                    WorkerPhase::Starting { .. } | WorkerPhase::Ready { .. }
                )
            })
            .count()
    }

    /// Issue 12.5: 4 workers, a random one SIGKILLed 10 times a second for 10 s, each
    /// replacement ready 20 ms after it starts. The pool never empties because of backoff,
    /// nobody gives up, and it is whole again at once after the storm.
    #[test]
    fn a_crash_storm_never_empties_the_pool_and_it_recovers_at_once() {
        let mut s = Sim::new(with_min_uptime(4, Duration::from_secs(1)));
        s.ready_gen(1);
        s.advance(Duration::from_secs(1));
        assert_eq!(s.st.phase, Phase::Running);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut samples, mut empty, mut ready_sum) = (0u32, 0u32, 0u32);
        for step in 0..1000 {
            s.advance(10 * MS);
            let due: Vec<Pid> = s
                .st
                .workers
                .iter()
                .filter(|w| {
                    matches!(w.phase, WorkerPhase::Starting { .. }) && w.started + 20 * MS <= s.now
                })
                .map(|w| w.pid)
                .collect();
            for p in due {
                s.ready(p);
            }
            if step % 10 == 0 {
                let alive: Vec<Pid> =
                    s.st.workers
                        .iter()
                        .filter(|w| !matches!(w.phase, WorkerPhase::Killed { .. }))
                        .map(|w| w.pid)
                        .collect();
                if !alive.is_empty() {
                    let i = usize::try_from(rand() % alive.len() as u64).unwrap();
                    let a = s.ev(Event::Exited {
                        pid: alive[i],
                        how: ExitKind::Signal(9),
                    });
                    assert_eq!(exit_code(&a), None, "never gives up under a storm");
                }
            }
            samples += 1;
            empty += u32::from(live(&s) == 0);
            ready_sum += u32::try_from(s.st.ready_count(1)).unwrap();
        }
        assert!(
            !matches!(s.st.phase, Phase::Stopping { .. }),
            "{:?}",
            s.st.phase
        );
        let mean = f64::from(ready_sum) / f64::from(samples);
        eprintln!(
            "storm: pool empty in {empty} of {samples} samples, {mean:.2} of 4 ready on average"
        );
        assert!(
            empty * 50 <= samples,
            "pool empty in {empty} of {samples} samples"
        );
        assert!(mean >= 2.5, "on average {mean:.2} of 4 workers ready");
        // After the storm: every slot is filled within the minimum delay plus a start.
        let mut t = Duration::ZERO;
        while s.st.ready_count(1) < 4 {
            assert!(t < 300 * MS, "not whole again after {t:?}");
            s.advance(10 * MS);
            t += 10 * MS;
            let p: Vec<Pid> =
                s.st.workers
                    .iter()
                    .filter(|w| matches!(w.phase, WorkerPhase::Starting { .. }))
                    .map(|w| w.pid)
                    .collect();
            for p in p {
                s.ready(p);
            }
        }
        assert!(s.st.slots.iter().all(|sl| sl.respawn_at.is_none()));
    }

    /// Issue 10: a service whose workers all die right after READY=1 again and again, after
    /// the first generation served, does not stay "active" silently: exit 1 with the reason.
    #[test]
    fn a_crash_loop_after_a_good_start_gives_up_with_the_reason() {
        let min = Duration::from_secs(1);
        let mut s = Sim::new(with_min_uptime(2, min));
        s.ready_gen(1);
        s.advance(min);
        assert_eq!(s.st.phase, Phase::Running);
        let served = s.now;
        s.blind();
        for p in s.pids(1) {
            s.exit(p, 3);
        }
        let mut code = None;
        while code.is_none() {
            assert!(
                s.now < served + GIVE_UP_QUIET + Duration::from_secs(5),
                "still looping at {:?}",
                s.now - served
            );
            // Each replacement reports ready after 100 ms and dies 300 ms later.
            let a = s.advance(100 * MS);
            code = exit_code(&a);
            let starting: Vec<Pid> =
                s.st.workers
                    .iter()
                    .filter(|w| matches!(w.phase, WorkerPhase::Starting { .. }))
                    .map(|w| w.pid)
                    .collect();
            for p in starting {
                s.ready(p);
            }
            let doomed: Vec<Pid> = s
                .st
                .workers
                .iter()
                .filter(|w| matches!(w.phase, WorkerPhase::Ready { since, .. } if since + 300 * MS <= s.now))
                .map(|w| w.pid)
                .collect();
            for p in doomed {
                let a = s.exit(p, 3);
                if let Some(st) = status(&a).filter(|st| st.contains("giving up")) {
                    assert!(s.now >= served + GIVE_UP_QUIET, "gave up too early: {st}");
                    assert!(st.contains("every worker failed to start 3 times"), "{st}");
                    assert!(st.contains("--min-uptime 1s"), "{st}");
                }
            }
            if matches!(s.st.phase, Phase::Stopping { .. }) {
                for p in s.pids(1) {
                    code = exit_code(&s.exit(p, 0)).or(code);
                }
                code = code.or(exit_code(&s.ev(Event::Tick)));
            }
        }
        assert_eq!(code, Some(exit::FAILURE));
        // One healthy slot is enough to keep going: no giving up then.
        let mut s = Sim::new(with_min_uptime(2, min));
        s.ready_gen(1);
        s.advance(min);
        s.blind();
        let bad = s.pids(1)[1];
        s.exit(bad, 3);
        for _ in 0..100 {
            s.advance(100 * MS);
            if let Some(w) = s.st.live_in(1, 1).map(|w| w.pid) {
                s.ready(w);
                s.now += 300 * MS;
                let a = s.exit(w, 3);
                assert_eq!(exit_code(&a), None);
            }
        }
        assert_eq!(s.st.phase, Phase::Running);
        assert!(s.st.slots[1].failed_starts > START_ATTEMPTS);
    }

    /// With every slot crashing at boot after the pool served, the earliest refill is due
    /// after the minimum delay: backoff alone never leaves the pool empty.
    #[test]
    fn backoff_alone_never_leaves_the_pool_empty() {
        let mut s = Sim::new(Config {
            restart: "100ms..30s".parse().unwrap(),
            ..cfg(2)
        });
        s.ready_gen(1);
        s.blind();
        // Make both slots' backoff long: their workers crash at boot again and again.
        for p in s.pids(1) {
            s.exit(p, 1);
        }
        for _ in 0..6 {
            for slot in 0..2 {
                if let Some(p) = s.st.live_in(1, slot).map(|w| w.pid) {
                    s.exit(p, 1);
                }
            }
            assert!(
                live(&s) > 0 || s.st.next_deadline() <= Some(s.now + 100 * MS),
                "pool empty with the next refill at {:?}",
                s.st.next_deadline().map(|t| t - s.now)
            );
            s.advance(100 * MS);
        }
    }

    /// Issue 11: a new worker that dies soon after READY=1, before the old generation is
    /// drained, fails the reload: rollback, the old workers keep serving.
    #[test]
    fn reload_waits_for_min_uptime_and_a_worker_dying_before_it_rolls_back() {
        let min = Duration::from_secs(2);
        let mut s = Sim::new(with_min_uptime(2, min));
        s.ready_gen(1);
        s.advance(min);
        s.blind();
        let old = s.pids(1);
        s.ev(Event::Reload {
            ticket: Some(4),
            wait: true,
        });
        let a = s.ready_gen(2);
        assert!(
            kills(&a).is_empty(),
            "old generation drained only after min-uptime"
        );
        assert!(reload_results(&a).is_empty());
        s.advance(500 * MS);
        let dying = s.pids(2)[1];
        let a = s.exit(dying, 3);
        let r = reload_results(&a);
        assert_eq!(r.len(), 1);
        let e = r[0].1.clone().unwrap_err();
        assert!(
            e.contains("after it was ready, within --min-uptime 2s"),
            "{e}"
        );
        assert!(
            !kills(&a).iter().any(|k| old.contains(&k.0)),
            "old ones kept"
        );
        assert_eq!(s.st.serving_generation, 1);
        // A good generation is accepted once every new worker stayed up min-uptime.
        for p in s.pids(2) {
            s.exit(p, 0);
        }
        s.ev(Event::Reload {
            ticket: Some(5),
            wait: true,
        });
        s.ready_gen(3);
        let a = s.advance(min.checked_sub(MS).unwrap());
        assert!(reload_results(&a).is_empty());
        let a = s.advance(MS);
        assert_eq!(reload_results(&a), [(vec![5], Ok(3))]);
        assert_eq!(kills(&a).len(), 2, "old generation drained now");
    }

    /// The same rule on the first start: READY=1 goes upstream only once every worker
    /// stayed up min-uptime; workers that die right after READY=1 fail the start.
    #[test]
    fn first_start_reports_ready_after_min_uptime_and_fails_on_early_deaths() {
        let min = Duration::from_secs(1);
        let mut s = Sim::new(with_min_uptime(2, min));
        let a = s.ready_gen(1);
        assert!(!has_upstream(&a, &Upstream::Ready));
        let a = s.advance(min);
        assert!(has_upstream(&a, &Upstream::Ready));
        // gunicorn without --preload and an app that fails to import.
        let mut s = Sim::new(with_min_uptime(1, min));
        let mut code = None;
        for _ in 0..START_ATTEMPTS {
            let p = s.pids(1)[0];
            s.ready(p);
            s.now += 200 * MS;
            let a = s.exit(p, 3);
            assert!(!has_upstream(&s.log, &Upstream::Ready));
            code = exit_code(&a);
            s.advance(Duration::from_secs(1));
        }
        assert_eq!(code, Some(exit::FAILURE));
        let st = status(&s.log).unwrap();
        assert!(st.contains("no worker ever started"), "{st}");
    }

    /// A new generation starts with fresh backoff: good new code never waits the old
    /// code's delay.
    #[test]
    fn a_new_generation_starts_with_fresh_backoff() {
        let mut s = Sim::new(cfg(2));
        s.ready_gen(1);
        s.blind();
        let p = s.pids(1)[1];
        s.exit(p, 1);
        for _ in 0..6 {
            let p = s.st.live_in(1, 1).unwrap().pid;
            s.exit(p, 1);
            let d = s.st.slots[1].respawn_at.unwrap() - s.now;
            s.advance(d);
        }
        assert!(s.st.slots[1].delay >= Duration::from_secs(6));
        s.ev(Event::Reload {
            ticket: None,
            wait: false,
        });
        s.ready_gen(2);
        assert_eq!(s.st.serving_generation, 2);
        assert_eq!(s.st.slots[1].delay, 100 * MS);
        let p = s.pids(2)[1];
        s.exit(p, 1);
        let p = s.st.live_in(2, 1).unwrap().pid;
        s.exit(p, 1);
        assert_eq!(s.st.next_deadline(), Some(s.now + 100 * MS));
    }

    /// Issues 10/11: no READY=1 after a few seconds is said early, once per generation,
    /// naming the fix; the ready timeout names it too.
    #[test]
    fn a_missing_ready_is_reported_early_and_the_timeout_names_the_fix() {
        let mut s = Sim::new(cfg(2));
        let a = s.advance(NO_READY_HINT_AFTER.checked_sub(MS).unwrap());
        assert!(logs(&a, Level::WARN).is_empty());
        let a = s.advance(MS);
        let w = logs(&a, Level::WARN);
        assert_eq!(w.len(), 1, "once, not per worker: {w:?}");
        assert!(
            w[0].contains("has not sent READY=1") && w[0].contains("--ready after:DUR"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("--ready exec"), "{}", w[0]);
        assert!(status(&a).unwrap().contains("no READY=1 yet"));
        let a = s.advance(Duration::from_secs(10));
        assert!(logs(&a, Level::WARN).is_empty(), "said once");
        let a = s.advance(Duration::from_secs(45));
        let w = logs(&a, Level::WARN);
        assert!(
            w.iter()
                .any(|m| m.contains("not ready within 1m0s") && m.contains("--ready exec")),
            "{w:?}"
        );
        // With --ready exec nothing waits for READY=1, so nothing is said.
        let mut s = Sim::new(Config {
            ready: ReadyMode::Exec,
            ..cfg(1)
        });
        let a = s.advance(Duration::from_secs(6));
        assert!(logs(&a, Level::WARN).is_empty());
    }

    /// Issue 12.7: `scale` is answered with the state machine's outcome.
    #[test]
    fn scale_and_reload_get_the_real_outcome() {
        let mut s = Sim::new(cfg(2));
        s.ready_gen(1);
        s.blind();
        let a = s.ev(Event::Scale {
            workers: 3,
            ticket: Some(1),
        });
        assert_eq!(answers(&a), [(1, Ok("scaling from 2 to 3 workers".into()))]);
        let p = s.pids(1)[2];
        s.ready(p);
        let a = s.ev(Event::Reload {
            ticket: Some(2),
            wait: false,
        });
        assert_eq!(answers(&a), [(2, Ok("reload requested".into()))]);
        assert!(reload_results(&a).is_empty());
        // The same wake-up: the reload runs, so this scale is refused, and said so.
        let a = s.ev(Event::Scale {
            workers: 5,
            ticket: Some(3),
        });
        let r = answers(&a);
        assert!(
            r[0].1
                .as_ref()
                .unwrap_err()
                .contains("reload is in progress"),
            "{r:?}"
        );
        assert_eq!(s.st.desired(), 3);
        let a = s.ev(Event::Scale {
            workers: 0,
            ticket: Some(4),
        });
        assert!(answers(&a)[0].1.is_err());
        // A signal's scale has nobody to answer: refused in the log.
        s.ready_gen(2);
        let a = s.ev(Event::Scale {
            workers: 0,
            ticket: None,
        });
        assert!(answers(&a).is_empty());
        assert!(logs(&a, Level::WARN)[0].contains("not scaling"));
        s.ev(Event::Stop);
        let a = s.ev(Event::Reload {
            ticket: Some(6),
            wait: false,
        });
        assert_eq!(answers(&a), [(6, Err("the supervisor is stopping".into()))]);
    }

    /// Issue 11: connections that wait in the accept queue with nobody accepting them are
    /// reported once, naming LISTEN_FDS / fd 3; looking stops once workers accept, and the
    /// looks get rarer and end when nothing happens.
    #[test]
    fn connections_nobody_accepts_are_reported_once() {
        let mut s = Sim::new(cfg(1));
        s.ready_gen(1);
        s.backlog = Some(Backlog {
            waiting: 2,
            stuck: 0,
            accepting: false,
        });
        let a = s.advance(ACCEPT_PROBE_FIRST);
        assert!(a.contains(&Action::ProbeAccepting));
        assert_eq!(
            s.st.next_deadline(),
            Some(s.now + ACCEPT_PROBE_FIRST),
            "confirm soon"
        );
        s.backlog = Some(Backlog {
            waiting: 2,
            stuck: 2,
            accepting: false,
        });
        let a = s.advance(ACCEPT_PROBE_FIRST);
        let w = logs(&a, Level::WARN);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("fd 3") && w[0].contains("LISTEN_FDS"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("for 2s"), "{}", w[0]);
        assert_eq!(s.st.next_deadline(), None, "said once, then no more looks");
        // Workers seen accepting: no more looks.
        let mut s = Sim::new(cfg(1));
        s.ready_gen(1);
        s.backlog = Some(Backlog {
            waiting: 0,
            stuck: 0,
            accepting: true,
        });
        s.advance(ACCEPT_PROBE_FIRST);
        assert_eq!(s.st.next_deadline(), None);
        // No traffic at all: rarer and rarer looks, and none after ACCEPT_PROBE_FOR.
        let mut s = Sim::new(cfg(1));
        s.ready_gen(1);
        let start = s.now;
        s.backlog = Some(Backlog::default());
        let mut looks = 0;
        while let Some(t) = s.st.next_deadline() {
            assert!(t <= start + ACCEPT_PROBE_FOR);
            s.now = t;
            let a = s.ev(Event::Tick);
            looks += usize::from(a.contains(&Action::ProbeAccepting));
        }
        assert!((5..=16).contains(&looks), "{looks} looks");
        // A new generation is looked at again.
        s.ev(Event::Reload {
            ticket: None,
            wait: false,
        });
        s.ready_gen(2);
        assert_eq!(s.st.next_deadline(), Some(s.now + ACCEPT_PROBE_FIRST));
    }
}

/// Worker recycling by age and memory (issue 15): new before old, one slot at a time,
/// never during a reload, a failed replacement leaves the old worker serving.
mod recycle {
    use super::*;
    use crate::config::AgeLimit;
    use crate::supervisor::state::{MEMORY_SAMPLE_EVERY, RecycleReason};

    const SEC: Duration = Duration::from_secs(1);

    fn aged(workers: u32, age: Duration) -> Config {
        Config {
            min_uptime: SEC,
            max_worker_age: Some(AgeLimit {
                base: age,
                jitter: 0,
            }),
            ..cfg(workers)
        }
    }

    /// Started, all ready and established, the accept probe out of the way.
    fn serving(c: Config) -> Sim {
        let mut s = Sim::new(c);
        s.ready_gen(1);
        s.advance(s.st.cfg.min_uptime);
        assert_eq!(s.st.phase, Phase::Running);
        s.blind();
        s
    }

    fn live(s: &Sim, slot: u32) -> Vec<Pid> {
        s.st.workers
            .iter()
            .filter(|w| w.slot == slot && !matches!(w.phase, WorkerPhase::Draining { .. }))
            .map(|w| w.pid)
            .collect()
    }

    fn ready_serving(s: &Sim) -> usize {
        s.st.workers
            .iter()
            .filter(|w| matches!(w.phase, WorkerPhase::Ready { .. }))
            .count()
    }

    fn logged(a: &[Action], needle: &str) -> bool {
        a.iter()
            .any(|a| matches!(a, Action::Log { message, .. } if message.contains(needle)))
    }

    /// Advances to the next armed deadline (at most `max`), asserting the pool stays full.
    fn step(s: &mut Sim, max: Duration) -> Vec<Action> {
        let t = s.st.next_deadline().expect("a deadline is armed");
        assert!(t <= s.now + max, "next deadline too far");
        s.now = t.max(s.now);
        let a = s.ev(Event::Tick);
        assert!(ready_serving(s) >= s.st.desired() as usize);
        a
    }

    #[test]
    fn age_recycles_new_before_old_one_slot_at_a_time() {
        let mut s = serving(aged(3, Duration::from_secs(60)));
        let first = s.pids(1);
        // Nothing until the age limit: the next deadline is exactly it.
        let started = s.st.workers[0].started;
        assert_eq!(
            s.st.next_deadline(),
            Some(started + Duration::from_secs(60))
        );
        let mut a = step(&mut s, Duration::from_secs(60));
        for slot in 0..3u32 {
            assert_eq!(spawns(&a), [(slot, 1)], "only slot {slot} is recycled");
            assert!(
                kills(&a).is_empty(),
                "nothing stopped before the new one is up"
            );
            assert!(logged(&a, "past its --max-worker-age limit 1m0s"), "{a:?}");
            let new = *live(&s, slot).last().unwrap();
            assert_ne!(new, first[slot as usize]);
            assert_eq!(s.st.workers.len(), 4, "one extra worker at most");
            // Ready is not enough: --min-uptime first.
            let r = s.ready(new);
            assert!(kills(&r).is_empty());
            let d = step(&mut s, SEC);
            assert_eq!(
                kills(&d),
                [(first[slot as usize], Signal::SIGTERM, false)],
                "the old worker drains once its replacement is established"
            );
            assert!(
                spawns(&d).is_empty(),
                "the next slot waits for the old one to exit"
            );
            assert_eq!(s.st.slots[slot as usize].recycles, 1);
            assert!(matches!(
                s.st.slots[slot as usize].last_recycle,
                Some((_, RecycleReason::Age { .. }))
            ));
            // Its exit lets the next overdue slot start (same age, no jitter).
            a = s.exit(first[slot as usize], 0);
        }
        assert!(spawns(&a).is_empty());
        // The replacements are young: the next recycle is an age limit away.
        let t = s.st.next_deadline().unwrap();
        assert!(t >= s.now + Duration::from_secs(55), "{:?}", t - s.now);
    }

    #[test]
    fn jitter_spreads_the_limits() {
        let mut c = aged(8, Duration::from_secs(1000));
        c.max_worker_age = Some(AgeLimit {
            base: Duration::from_secs(1000),
            jitter: 10,
        });
        let s = serving(c);
        let mut limits: Vec<Duration> =
            s.st.workers
                .iter()
                .map(|w| w.recycle_at.unwrap() - w.started)
                .collect();
        limits.sort();
        limits.dedup();
        assert_eq!(limits.len(), 8, "each worker its own limit: {limits:?}");
        assert!(
            limits.iter().all(|l| (900..=1100).contains(&l.as_secs())),
            "{limits:?}"
        );
    }

    #[test]
    fn failed_replacement_keeps_the_old_worker_and_retries_with_backoff() {
        let mut s = serving(aged(2, Duration::from_secs(30)));
        let old = s.pids(1);
        let a = step(&mut s, Duration::from_secs(30));
        assert_eq!(spawns(&a), [(0, 1)]);
        let new = *live(&s, 0).last().unwrap();
        let a = s.exit(new, 1);
        assert!(kills(&a).is_empty(), "the old worker is left alone");
        assert!(spawns(&a).is_empty());
        assert!(
            logged(&a, "keeps serving; recycling again in 100ms"),
            "{a:?}"
        );
        assert_eq!(s.st.slots[0].recycles, 0);
        assert!(
            s.st.worker(old[0])
                .is_some_and(|w| matches!(w.phase, WorkerPhase::Ready { .. }))
        );
        // Retried after 100ms, then 200ms (the --restart-delay bounds).
        let a = step(&mut s, Duration::from_millis(100));
        assert_eq!(spawns(&a), [(0, 1)]);
        let new = *live(&s, 0).last().unwrap();
        let a = s.exit(new, 1);
        assert!(logged(&a, "recycling again in 200ms"), "{a:?}");
        // The third try comes up: only now does the old worker drain.
        let a = step(&mut s, Duration::from_millis(200));
        assert_eq!(spawns(&a), [(0, 1)]);
        let new = *live(&s, 0).last().unwrap();
        s.ready(new);
        let a = step(&mut s, SEC);
        assert_eq!(kills(&a), [(old[0], Signal::SIGTERM, false)]);
        assert_eq!(s.st.recycle_delay, s.st.cfg.restart.min, "backoff reset");
    }

    #[test]
    fn replacement_that_cannot_start_keeps_the_old_worker() {
        let mut s = serving(aged(1, Duration::from_secs(30)));
        let old = s.pids(1)[0];
        s.now += Duration::from_secs(30);
        // Handle the tick without the Sim's automatic spawn success.
        let a = handle(&mut s.st, Event::Tick, s.now);
        assert_eq!(spawns(&a), [(0, 1)]);
        let a = handle(
            &mut s.st,
            Event::SpawnFailed {
                slot: 0,
                generation: 1,
                error: "fork: EAGAIN".into(),
                permanent: false,
            },
            s.now,
        );
        assert!(kills(&a).is_empty());
        assert!(exit_code(&a).is_none());
        assert!(logged(&a, "could not be started: fork: EAGAIN"), "{a:?}");
        assert_eq!(s.st.recycle, None);
        assert!(s.st.recycle_retry_at.is_some());
        assert!(s.st.worker(old).is_some());
    }

    #[test]
    fn old_worker_dying_during_the_recycle() {
        let mut s = serving(aged(2, Duration::from_secs(30)));
        let old = s.pids(1);
        step(&mut s, Duration::from_secs(30));
        let new = *live(&s, 0).last().unwrap();
        // The old one crashes: the starting replacement covers the slot (no refill) ...
        let a = s.exit(old[0], 1);
        assert!(spawns(&a).is_empty(), "{a:?}");
        // ... and if the replacement fails too, the slot is refilled at once.
        let a = s.exit(new, 1);
        assert_eq!(spawns(&a), [(0, 1)], "{a:?}");
        assert_eq!(s.st.recycle, None);
    }

    #[test]
    fn deferred_during_a_reload_and_cancelled_by_one() {
        let mut s = serving(aged(2, Duration::from_secs(30)));
        let old = s.pids(1);
        // A reload runs when the age limit passes: no recycle.
        s.now += Duration::from_secs(29);
        s.ev(Event::Reload {
            ticket: None,
            wait: false,
        });
        let a = s.advance(Duration::from_secs(2));
        assert!(spawns(&a).is_empty(), "no recycle during a reload: {a:?}");
        assert_eq!(s.st.recycle, None);
        // The reload fails (rolled back): the overdue recycle follows right after.
        let g2 = s.pids(2);
        let a = s.exit(g2[0], 1);
        assert!(logged(&a, "rolled back"), "{a:?}");
        assert_eq!(
            spawns(&a),
            [(0, 1)],
            "recycling resumes after the reload: {a:?}"
        );
        s.exit(g2[1], 0);
        let new = *live(&s, 0).last().unwrap();
        // A reload asked for during the recycle cancels it: the replacement is stopped.
        let a = s.ev(Event::Reload {
            ticket: None,
            wait: false,
        });
        assert!(kills(&a).contains(&(new, Signal::SIGTERM, false)), "{a:?}");
        assert!(!kills(&a).iter().any(|k| old.contains(&k.0)), "{a:?}");
        assert_eq!(spawns(&a), [(0, 3), (1, 3)]);
        assert_eq!(s.st.recycle, None);
        assert_eq!(s.st.slots[0].recycles, 0);
    }

    #[test]
    fn memory_recycles_after_two_samples_above_the_limit() {
        let c = Config {
            max_worker_memory: Some(100 << 20),
            ..cfg(2)
        };
        let mut s = serving(c);
        let old = s.pids(1);
        assert_eq!(s.st.memory_sample_at, Some(s.now + MEMORY_SAMPLE_EVERY));
        s.rss.insert(old[0], 50 << 20);
        s.rss.insert(old[1], 150 << 20);
        let a = s.advance(MEMORY_SAMPLE_EVERY);
        assert!(a.contains(&Action::SampleMemory));
        assert!(spawns(&a).is_empty(), "one sample above is not enough");
        // Dips below: counting starts over.
        s.rss.insert(old[1], 90 << 20);
        s.advance(MEMORY_SAMPLE_EVERY);
        s.rss.insert(old[1], 150 << 20);
        let a = s.advance(MEMORY_SAMPLE_EVERY);
        assert!(spawns(&a).is_empty());
        let a = s.advance(MEMORY_SAMPLE_EVERY);
        assert_eq!(spawns(&a), [(1, 1)], "{a:?}");
        assert!(
            logged(&a, "resident memory 150.0M above --max-worker-memory 100M"),
            "{a:?}"
        );
        // 20 s after its start: young, so the log says the limit may be too low.
        assert!(
            logged(
                &a,
                "if --max-worker-memory is below what a fresh worker needs"
            ),
            "{a:?}"
        );
        assert!(s.st.status_line().contains("recycling worker 1 (memory)"));
        let new = *live(&s, 1).last().unwrap();
        // (--min-uptime 0: established when ready)
        let a = s.ready(new);
        assert_eq!(kills(&a), [(old[1], Signal::SIGTERM, false)]);
        assert!(matches!(
            s.st.slots[1].last_recycle,
            Some((_, RecycleReason::Memory { rss, limit })) if rss == 150 << 20 && limit == 100 << 20
        ));
    }

    #[test]
    fn nothing_armed_without_the_options() {
        let mut s = serving(cfg(3));
        assert!(s.st.workers.iter().all(|w| w.recycle_at.is_none()));
        assert_eq!(s.st.memory_sample_at, None);
        assert_eq!(s.st.next_deadline(), None, "no wake-ups at all when idle");
        let a = s.advance(Duration::from_secs(3600));
        assert!(!a.contains(&Action::SampleMemory));
        // With them: an age deadline per worker, a memory sample every 5s.
        let c = Config {
            max_worker_memory: Some(1 << 30),
            ..aged(3, Duration::from_secs(3600))
        };
        let s = serving(c);
        assert!(s.st.workers.iter().all(|w| w.recycle_at.is_some()));
        let first_sample = s.st.workers[0].started + MEMORY_SAMPLE_EVERY;
        assert_eq!(s.st.memory_sample_at, Some(first_sample));
        assert_eq!(s.st.next_deadline(), Some(first_sample));
    }
}

/// The schedules that used to live in the executor: systemd's watchdog, its reload
/// timeout, traffic samples, and the status verb — all fired by ticks of the fake clock.
mod schedules {
    use super::*;

    fn count(a: &[Action], m: &Upstream) -> usize {
        upstream(a).iter().filter(|d| d.contains(m)).count()
    }

    #[test]
    fn systemd_watchdog_is_pinged_every_half_interval_from_the_start() {
        let mut s = Sim::new(Config {
            systemd_watchdog: Some(Duration::from_secs(10)),
            ..cfg(1)
        });
        assert_eq!(s.st.watchdog_ping_at, Some(s.now));
        let a = s.advance(MS);
        assert_eq!(count(&a, &Upstream::Watchdog), 1);
        assert!(count(&s.advance(Duration::from_secs(4)), &Upstream::Watchdog) == 0);
        assert_eq!(
            count(&s.advance(Duration::from_secs(1)), &Upstream::Watchdog),
            1
        );
        assert!(s.st.next_deadline().is_some_and(|t| t > s.now));
    }

    #[test]
    fn a_slow_reload_extends_systemds_timeout_every_5s_until_it_ends() {
        let mut s = Sim::new(Config {
            ready_timeout: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(10),
            ..cfg(1)
        });
        s.ready_gen(1);
        s.blind();
        s.ev(Event::Reload {
            ticket: None,
            wait: false,
        });
        let extend = Upstream::ExtendTimeout(EXTEND_BY);
        // The executor ticks right after the event that started the reload.
        let mut extends = count(&s.advance(Duration::ZERO), &extend);
        assert_eq!(extends, 1, "the first extend goes out at once");
        // Generation 2 never gets ready: rolled back at --ready-timeout (20 s). Until
        // then, one extend every 5 s; none after.
        for _ in 0..7 {
            let a = s.advance(Duration::from_millis(2500));
            extends += count(&a, &extend);
        }
        assert!(s.st.reload.is_some());
        assert_eq!(extends, 4, "at 0, 5, 10 and 15 s");
        let a = s.advance(Duration::from_millis(2500));
        assert!(s.st.reload.is_none(), "rolled back at 20 s");
        assert_eq!(count(&a, &extend), 0);
        assert_eq!(count(&s.advance(Duration::from_secs(10)), &extend), 0);
    }

    #[test]
    fn traffic_is_sampled_on_a_schedule_and_rearmed_by_the_answer() {
        let mut s = Sim::new(Config {
            exit_idle_after: Some(Duration::from_secs(10)),
            ..cfg(1)
        });
        let every = s.st.cfg.traffic_sample_every().unwrap();
        assert_eq!(every, Duration::from_secs(1));
        assert_eq!(s.st.traffic_sample_at, Some(s.now + every));
        let a = s.advance(every);
        assert!(a.contains(&Action::SampleTraffic));
        // Nothing more until the answer comes back...
        assert!(!s.advance(every * 3).contains(&Action::SampleTraffic));
        // ... which arms the next one from its own end.
        s.ev(Event::Traffic { busy: false });
        assert_eq!(s.st.traffic_sample_at, Some(s.now + every));
    }

    #[test]
    fn status_is_answered_by_the_state_machine() {
        let mut s = Sim::new(cfg(1));
        let a = s.ev(Event::Status {
            ticket: Some(9),
            json: true,
        });
        assert!(a.contains(&Action::Report {
            ticket: Some(9),
            json: true
        }));
    }

    #[test]
    fn signals_scale_by_one_from_the_current_pool() {
        let mut s = Sim::new(cfg(2));
        s.ready_gen(1);
        let a = s.ev(Event::ScaleStep { up: true });
        assert_eq!(spawns(&a), [(2, 1)]);
        assert_eq!(s.st.desired(), 3);
        assert_eq!(
            s.st.cfg.workers, 2,
            "the static config is not runtime state"
        );
        s.ev(Event::ScaleStep { up: false });
        s.ev(Event::ScaleStep { up: false });
        assert_eq!(s.st.desired(), 1);
    }

    #[test]
    fn rolling_strategy_makes_a_plain_reload_rolling() {
        let mut s = Sim::new(Config {
            rolling: true,
            ..cfg(2)
        });
        s.ready_gen(1);
        let a = s.ev(Event::Reload {
            ticket: None,
            wait: false,
        });
        assert_eq!(spawns(&a), [(0, 2)]);
    }
}

mod random_walk;
