//! A seeded random walk over `handle()`: random configurations, random events (exits,
//! notifications, reload/scale/status tickets, traffic, stops, ticks of a fake clock), and
//! after every step the invariants the executor relies on. A failure names its seed:
//! rerun it alone with `RANDOM_WALK_SEED=N cargo test --lib random_walk`.

use std::collections::{HashMap, HashSet, VecDeque};

use super::*;
use crate::config::{AgeLimit, RestartDelay};

const SEEDS: u64 = 200;
const STEPS: usize = 500;

/// xorshift64*: small, repeatable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn small(&mut self, n: u64) -> u32 {
        u32::try_from(self.below(n)).unwrap()
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        let i = usize::try_from(self.below(items.len().max(1) as u64)).unwrap();
        items.get(i).copied()
    }
}

fn random_config(r: &mut Rng) -> Config {
    let secs = Duration::from_secs;
    let exit_idle_after = r.chance(30).then(|| secs(5 + r.below(30)));
    Config {
        workers: 1 + r.small(4),
        ready: match r.below(3) {
            0 => ReadyMode::Notify,
            1 => ReadyMode::Exec,
            _ => ReadyMode::After(Duration::from_millis(100 + r.below(3000))),
        },
        ready_timeout: secs(5 + r.below(60)),
        restart: RestartDelay {
            min: Duration::from_millis(100),
            max: secs(1 + r.below(30)),
        },
        stop_signal: Signal::SIGTERM,
        stop_timeout: secs(1 + r.below(30)),
        worker_watchdog: r.chance(30).then(|| secs(1 + r.below(10))),
        lazy: exit_idle_after.is_some() && r.chance(50),
        exit_idle_after,
        min_uptime: if r.chance(50) {
            Duration::ZERO
        } else {
            secs(r.below(5))
        },
        max_worker_memory: r.chance(30).then_some(100 << 20),
        max_worker_age: r.chance(30).then(|| AgeLimit {
            base: secs(10 + r.below(120)),
            jitter: r.small(50),
        }),
        rolling: r.chance(30),
        systemd_watchdog: r.chance(30).then(|| secs(1 + r.below(20))),
    }
}

struct Walk {
    st: State,
    now: Instant,
    r: Rng,
    next_pid: i32,
    next_ticket: Ticket,
    /// Issued tickets and how often each was answered.
    tickets: HashMap<Ticket, u32>,
    /// Pids already reaped (`Exited` fed): never to be signalled again.
    reaped: HashSet<Pid>,
    /// Pids that were sent SIGKILL.
    sigkilled: HashSet<Pid>,
    exited: Option<u8>,
    step: usize,
    /// The most generations the slots ran at once since the last time no old worker was
    /// left (see `check`).
    mixed: usize,
}

impl Walk {
    fn new(seed: u64) -> Walk {
        let mut r = Rng::new(seed);
        let cfg = random_config(&mut r);
        let mut st = State::new(cfg);
        st.seed = seed;
        Walk {
            st,
            now: Instant::now(),
            r,
            next_pid: 1000,
            next_ticket: 1,
            tickets: HashMap::new(),
            reaped: HashSet::new(),
            sigkilled: HashSet::new(),
            exited: None,
            step: 0,
            mixed: 1,
        }
    }

    /// A control client's ticket, or none (the same verb from a signal).
    fn ticket(&mut self) -> Option<Ticket> {
        if self.r.chance(30) {
            return None;
        }
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(t, 0);
        Some(t)
    }

    fn answered(&mut self, t: Ticket) {
        let n = self
            .tickets
            .get_mut(&t)
            .unwrap_or_else(|| panic!("answer for unknown ticket {t}"));
        *n += 1;
        assert_eq!(*n, 1, "ticket {t} answered twice");
    }

    /// Feeds one event and, like the executor, the outcomes of its actions.
    fn feed(&mut self, e: Event) {
        let tick = e == Event::Tick;
        let mut queue = VecDeque::from([e]);
        while let Some(e) = queue.pop_front() {
            if self.exited.is_some() {
                return;
            }
            if let Event::Exited { pid, .. } = e {
                self.reaped.insert(pid);
            }
            let actions = handle(&mut self.st, e, self.now);
            let mut outcomes = Vec::new();
            for a in actions {
                self.act(a, &mut outcomes);
            }
            queue.extend(outcomes);
            self.check();
        }
        if tick && self.exited.is_none() {
            // Everything due fired: nothing armed in the past, and a second tick at the
            // same moment leaves nothing due at all (the executor never spins).
            assert!(
                self.st.next_deadline().is_none_or(|t| t >= self.now),
                "a deadline in the past after a tick: {:?} < now {:?}\n{:#?}",
                self.st.next_deadline(),
                self.now,
                self.st
            );
            let mut outcomes = Vec::new();
            for a in handle(&mut self.st, Event::Tick, self.now) {
                self.act(a, &mut outcomes);
            }
            self.check();
            assert!(
                self.st.next_deadline().is_none_or(|t| t > self.now),
                "a deadline stays due after two ticks: {:#?}",
                self.st
            );
            for e in outcomes {
                self.feed(e);
            }
        }
    }

    /// What the executor would do with `a`; outcomes that come back as events are queued.
    fn act(&mut self, a: Action, outcomes: &mut Vec<Event>) {
        match a {
            Action::Spawn { slot, generation } => {
                self.next_pid += 1;
                outcomes.push(if self.r.chance(5) {
                    Event::SpawnFailed {
                        slot,
                        generation,
                        error: "injected".into(),
                        permanent: self.r.chance(20),
                    }
                } else {
                    Event::Spawned {
                        slot,
                        generation,
                        pid: Pid::from_raw(self.next_pid),
                    }
                });
            }
            Action::Kill { pid, signal, .. } => {
                assert!(!self.reaped.contains(&pid), "signalled reaped pid {pid}");
                assert!(self.st.worker(pid).is_some(), "signalled stranger {pid}");
                if signal == Signal::SIGKILL {
                    self.sigkilled.insert(pid);
                }
            }
            Action::Answer { ticket, .. }
            | Action::Upgrade { ticket, .. }
            | Action::Report {
                ticket: Some(ticket),
                ..
            } => self.answered(ticket),
            Action::ReloadFinished { tickets, .. } => {
                for t in tickets {
                    self.answered(t);
                }
            }
            Action::ProbeAccepting => {
                let found = self.r.chance(80).then(|| Backlog {
                    waiting: self.r.small(3),
                    stuck: u32::from(self.r.chance(10)),
                    accepting: self.r.chance(50),
                });
                outcomes.push(Event::Backlog(found));
            }
            Action::SampleMemory => {
                let pids: Vec<Pid> = self.st.workers.iter().map(|w| w.pid).collect();
                let samples = pids
                    .into_iter()
                    .map(|p| (p, self.r.below(200) << 20))
                    .collect();
                outcomes.push(Event::Memory(samples));
            }
            Action::SampleTraffic => outcomes.push(Event::Traffic {
                busy: self.r.chance(50),
            }),
            Action::Exit { code } => self.exited = Some(code),
            Action::Report { ticket: None, .. } | Action::Notify(_) | Action::Log { .. } => {}
        }
    }

    fn check(&mut self) {
        // Documented: with --lazy, the first connection after an idle period starts a
        // generation at once, while workers stopped before may still drain: there only
        // generations with a live worker count.
        let lazy = self.st.cfg.lazy;
        let mut gens: Vec<u32> = (self.st.workers.iter())
            .filter(|w| !lazy || w.phase.is_live())
            // Spawned for a generation already given up: SIGKILLed at once, never served.
            .filter(|w| w.phase.stop_reason() != Some(StopReason::Unwanted))
            .map(|w| w.generation)
            .collect();
        gens.sort_unstable();
        gens.dedup();
        let mut slot_gens: Vec<u32> = self.st.slots.iter().map(|s| s.generation).collect();
        slot_gens.sort_unstable();
        slot_gens.dedup();
        // Documented: after a failed rolling restart the slots run different generations,
        // and each may have a worker of the one before it draining, until the drains of
        // the next reload are over.
        if gens.iter().all(|g| slot_gens.contains(g)) {
            self.mixed = slot_gens.len();
        }
        self.mixed = self.mixed.max(slot_gens.len());
        let allowed = 2 + self.mixed.saturating_sub(1);
        assert!(
            gens.len() <= allowed,
            "generations alive {gens:?}, slots on {slot_gens:?}: {:?}",
            (self.st.workers.iter())
                .map(|w| (w.slot, w.generation, w.pid.as_raw(), w.phase))
                .collect::<Vec<_>>()
        );
        for w in &self.st.workers {
            if matches!(w.phase, WorkerPhase::Killed { .. }) {
                assert!(
                    self.sigkilled.contains(&w.pid),
                    "pid {} is Killed but got no SIGKILL",
                    w.pid
                );
            }
        }
    }

    fn random_event(&mut self) -> Event {
        let pids: Vec<Pid> = self.st.workers.iter().map(|w| w.pid).collect();
        let roll = self.r.below(100);
        let pid = self.r.pick(&pids);
        match (roll, pid) {
            (30..=49, Some(pid)) => Event::Notify {
                pid,
                msg: NotifyMsg {
                    ready: self.r.chance(80),
                    watchdog: self.r.chance(50),
                    watchdog_trigger: self.r.chance(2),
                    status: self.r.chance(10).then(|| "busy".to_string()),
                    ..NotifyMsg::default()
                },
            },
            (50..=61, Some(pid)) => Event::Exited {
                pid,
                how: if self.r.chance(50) {
                    ExitKind::Code(i32::from(self.r.chance(50)))
                } else {
                    ExitKind::Signal(9)
                },
            },
            (62..=67, _) => Event::Reload {
                ticket: self.ticket(),
                wait: self.r.chance(50),
            },
            (68..=70, _) => Event::RollingRestart {
                ticket: self.ticket(),
                wait: self.r.chance(50),
            },
            (71..=75, _) => Event::Scale {
                workers: self.r.small(6),
                ticket: self.ticket(),
            },
            (76..=77, _) => Event::ScaleStep {
                up: self.r.chance(50),
            },
            (78..=80, _) => Event::Status {
                ticket: self.ticket(),
                json: self.r.chance(50),
            },
            (81..=89, _) => Event::Traffic {
                busy: self.r.chance(50),
            },
            (90, _) if self.r.chance(30) => Event::Stop,
            (0..=29, _) => {
                self.now += Duration::from_millis(self.r.below(8000));
                Event::Tick
            }
            _ => {
                self.now += Duration::from_millis(self.r.below(500));
                Event::Tick
            }
        }
    }

    fn run(&mut self) {
        self.feed(Event::Start);
        for step in 0..STEPS {
            self.step = step;
            if self.exited.is_some() {
                break;
            }
            let e = self.random_event();
            self.feed(e);
        }
        // Wind down: stop, every worker exits, ticks until the supervisor exits.
        self.feed(Event::Stop);
        for _ in 0..100 {
            if self.exited.is_some() {
                break;
            }
            let pids: Vec<Pid> = self.st.workers.iter().map(|w| w.pid).collect();
            for pid in pids {
                self.feed(Event::Exited {
                    pid,
                    how: ExitKind::Code(0),
                });
            }
            self.now += Duration::from_secs(1);
            self.feed(Event::Tick);
        }
        assert!(self.exited.is_some(), "never exited after a stop");
        let unanswered: Vec<_> = self.tickets.iter().filter(|(_, n)| **n == 0).collect();
        assert!(
            unanswered.is_empty(),
            "tickets never answered: {unanswered:?}"
        );
    }
}

#[test]
fn random_walks_keep_the_invariants() {
    let seeds: Vec<u64> = match std::env::var("RANDOM_WALK_SEED") {
        Ok(s) => vec![s.parse().expect("RANDOM_WALK_SEED is a number")],
        Err(_) => (0..SEEDS).collect(),
    };
    let mut events = 0;
    for seed in seeds {
        let mut w = Walk::new(seed);
        let cfg = w.st.cfg.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            panic!(
                "random walk seed {seed} failed at step {}: {msg}\nconfig: {cfg:?}",
                w.step
            );
        }
        events += w.step;
    }
    // The walks do walk (not all cut short by an early exit).
    assert!(events > 1000, "only {events} steps in all");
}
