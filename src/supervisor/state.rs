//! The supervisor's state: nouns and queries only, plain data (no closures, no `Rc`) so
//! that it can be inspected, tested and serialized. Transitions live in `handle.rs`.
//!
//! A worker is identified by its pid; its `slot` (WORKER_ID) and `generation` are separate
//! because during a reload two generations overlap and both have a worker in each slot.
//! Generations, one name each: `Worker::generation` (what it runs), `Slot::generation`
//! (what the slot refills with), `State::serving_generation` (the pool's, after the last
//! successful reload), `State::newest_generation` (the highest number used),
//! `Reload::generation` (the one being rolled out). The pool's size is `State::desired()`
//! (one `Slot` each); `Config` is static.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::event::{ExitKind, Ticket, WorkerTag, human};
use crate::config::{AgeLimit, ReadyMode, RestartDelay};

/// A slot is refilled with the minimum delay again once its worker stayed up this long.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// A slot that fails to start this many times in a row gives up: while the first
/// generation is starting, at once (bad command, crash at boot); later, once every slot
/// did so and no worker stayed up for `GIVE_UP_QUIET` (a crash loop after a good start).
/// Defined in `settings` because the units' start timeout is derived from it.
pub use crate::settings::START_ATTEMPTS;

/// After the first generation served: give up on a crash loop only when no worker stayed
/// up (ready for `--min-uptime`) for this long, so that a storm of outside kills, where
/// some workers always get through, never takes the service down.
pub const GIVE_UP_QUIET: Duration = Duration::from_secs(10);

/// With `--ready notify`, a worker still without `READY=1` after this long is reported
/// (once per generation), naming `--ready after:DUR` / `--ready exec`, long before
/// `--ready-timeout`.
pub const NO_READY_HINT_AFTER: Duration = Duration::from_secs(5);

/// Checks that the serving workers accept connections from the inherited sockets: the first
/// this long after a generation starts serving, then at doubling intervals...
pub const ACCEPT_PROBE_FIRST: Duration = Duration::from_secs(2);
/// ... of at most this ...
pub const ACCEPT_PROBE_MAX: Duration = Duration::from_secs(60);
/// ... for this long at most (then the generation is left alone: no idle wake-ups).
pub const ACCEPT_PROBE_FOR: Duration = Duration::from_secs(600);

/// With `--max-worker-memory`: the workers' resident memory is sampled this often...
pub const MEMORY_SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// ... and a worker above the limit in this many samples in a row is recycled.
pub const MEMORY_SAMPLES: u32 = 2;

/// While a reload runs, systemd's reload timeout is pushed out by `EXTEND_BY`, every
/// `EXTEND_EVERY`, for as long as the reload is within its own time budget
/// (`Reload::budget`).
pub const EXTEND_EVERY: Duration = Duration::from_secs(5);
pub const EXTEND_BY: Duration = Duration::from_secs(15);

/// The supervisor's settings, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// The number of workers at start; `scale` changes the pool (`State::desired`), never
    /// this.
    pub workers: u32,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub restart: RestartDelay,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// `--worker-watchdog`: a ready worker must send `WATCHDOG=1` at least this often.
    pub worker_watchdog: Option<Duration>,
    /// `--exit-idle-after`: stop when no connection was seen for this long.
    pub exit_idle_after: Option<Duration>,
    /// `--lazy`: start workers on the first connection; when idle, go back to holding the
    /// sockets instead of exiting.
    pub lazy: bool,
    /// `--min-uptime`: a worker counts as started only once it stayed up this long after
    /// it was ready; one that dies sooner is a failed start (a reload rolls back).
    pub min_uptime: Duration,
    /// `--max-worker-memory`: recycle a worker whose resident memory (bytes) stays above.
    pub max_worker_memory: Option<u64>,
    /// `--max-worker-age`: recycle a worker older than its own (jittered) limit.
    pub max_worker_age: Option<AgeLimit>,
    /// `--reload-strategy rolling`: SIGHUP and `reload` replace one slot at a time.
    pub rolling: bool,
    /// systemd's watchdog for the supervisor (`WATCHDOG_USEC`): pinged every half of it.
    pub systemd_watchdog: Option<Duration>,
}

impl Config {
    /// With `--exit-idle-after`: how often the sockets' traffic is sampled (a tenth of the
    /// idle timeout, within 200 ms .. 5 s).
    pub fn traffic_sample_every(&self) -> Option<Duration> {
        self.exit_idle_after
            .map(|d| (d / 10).clamp(Duration::from_millis(200), Duration::from_secs(5)))
    }
}

/// Why a worker is being stopped. Decides how its exit is treated (`is_failure`); the log
/// text comes from `Display`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A newer generation took over its slot.
    Replaced,
    /// The supervisor is stopping.
    Shutdown,
    /// It was not ready within `--ready-timeout`.
    ReadyTimeout,
    /// Its generation was rolled back.
    RolledBack,
    /// It was spawned for a slot or generation that no longer needs it.
    Unwanted,
    /// It missed its `--worker-watchdog`.
    Watchdog,
    /// Its slot was removed by `scale`.
    ScaledDown,
    /// `--lazy`: no connection for `--exit-idle-after`.
    Idle,
    /// Its replacement took over (`--max-worker-memory`, `--max-worker-age`).
    Recycled,
    /// It was the replacement of a recycle that was cancelled.
    RecycleCancelled,
}

impl StopReason {
    /// Stopped because it failed (its exit is a failed start or a crash), not on request.
    pub fn is_failure(self) -> bool {
        matches!(self, StopReason::ReadyTimeout | StopReason::Watchdog)
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Replaced => "replaced by a newer generation",
            StopReason::Shutdown => "supervisor stopping",
            StopReason::ReadyTimeout => "not ready in time",
            StopReason::RolledBack => "its generation was rolled back",
            StopReason::Unwanted => "not wanted any more",
            StopReason::Watchdog => "missed its watchdog",
            StopReason::ScaledDown => "scaled down",
            StopReason::Idle => "idle",
            StopReason::Recycled => "recycled",
            StopReason::RecycleCancelled => "its recycle was cancelled",
        })
    }
}

/// Where a worker is in its life. The data that only means something in one phase lives
/// in that phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPhase {
    /// Running, not ready yet. Killed at `deadline`; with `--ready after:DUR`, ready at
    /// `ready_at`.
    Starting {
        deadline: Instant,
        ready_at: Option<Instant>,
    },
    /// Ready since `since`; `last_ping` is its last `WATCHDOG=1` (or `since`), for
    /// `--worker-watchdog`.
    Ready { since: Instant, last_ping: Instant },
    /// Sent the stop signal for `reason`; SIGKILLed at `kill_at` if still alive.
    Draining {
        kill_at: Instant,
        reason: StopReason,
    },
    /// Sent SIGKILL (for `reason`); waiting to reap it.
    Killed { reason: StopReason },
}

impl WorkerPhase {
    /// Starting or ready: not being stopped.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            WorkerPhase::Starting { .. } | WorkerPhase::Ready { .. }
        )
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, WorkerPhase::Ready { .. })
    }

    /// Why it is being stopped, once it is.
    pub fn stop_reason(&self) -> Option<StopReason> {
        match *self {
            WorkerPhase::Draining { reason, .. } | WorkerPhase::Killed { reason } => Some(reason),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub slot: u32,
    pub generation: u32,
    pub pid: Pid,
    pub started: Instant,
    pub phase: WorkerPhase,
    /// The worker's own `STATUS=` text.
    pub status: Option<String>,
    /// True once it stayed up `--min-uptime` after it was ready: only then did it start
    /// (an exit before is a failed start, and a reload waits for it).
    pub established: bool,
    /// With `--max-worker-age`: when this worker reaches its own age limit.
    pub recycle_at: Option<Instant>,
    /// With `--max-worker-memory`: the last resident memory sampled (bytes), and in how
    /// many samples in a row it was above the limit.
    pub rss: Option<u64>,
    pub rss_over: u32,
}

/// Per-slot bookkeeping for the serving generation: restart backoff and counters.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The generation this slot runs: refills use it. A reload moves it forward once the
    /// new worker for the slot is ready.
    pub generation: u32,
    /// Delay before the next refill of this slot.
    pub delay: Duration,
    /// When a refill is due.
    pub respawn_at: Option<Instant>,
    pub restarts: u32,
    /// Consecutive failed starts (exit or timeout before ready).
    pub failed_starts: u32,
    pub last_exit: Option<ExitKind>,
    /// Workers of this slot replaced by recycling, and the last time and why.
    pub recycles: u32,
    pub last_recycle: Option<(Instant, RecycleReason)>,
}

/// Why a worker is recycled, with the measured value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleReason {
    /// Resident memory (bytes) above `--max-worker-memory` (bytes) in consecutive samples.
    Memory { rss: u64, limit: u64 },
    /// Up for `age`, past its own limit `limit` (from `--max-worker-age`).
    Age { age: Duration, limit: Duration },
}

impl RecycleReason {
    /// `memory` or `age`.
    pub fn kind(&self) -> &'static str {
        match self {
            RecycleReason::Memory { .. } => "memory",
            RecycleReason::Age { .. } => "age",
        }
    }
}

impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| {
            #[allow(clippy::cast_precision_loss)]
            let m = b as f64 / f64::from(1 << 20);
            format!("{m:.1}M")
        };
        match *self {
            RecycleReason::Memory { rss, limit } => write!(
                f,
                "resident memory {} above --max-worker-memory {} in {MEMORY_SAMPLES} samples \
                 {}s apart",
                mib(rss),
                crate::config::Size(limit),
                MEMORY_SAMPLE_EVERY.as_secs()
            ),
            RecycleReason::Age { age, limit } => write!(
                f,
                "up {}, past its --max-worker-age limit {}",
                super::event::human(age),
                super::event::human(limit)
            ),
        }
    }
}

/// A slot being recycled: its replacement starts, and once it is ready and up for
/// `--min-uptime` the old worker is drained. One at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recycle {
    pub slot: u32,
    pub generation: u32,
    pub old: Pid,
    /// The replacement, once spawned.
    pub new: Option<Pid>,
    pub reason: RecycleReason,
    pub started: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `--lazy`: holding the sockets without workers until a connection arrives.
    Idle,
    /// The first generation is starting; READY=1 not sent yet.
    Starting,
    Running,
    /// Stopping everything; force-kill at `force_at`. Exit with `code` once all are reaped.
    Stopping {
        force_at: Option<Instant>,
        code: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
    /// Start a complete new generation, then drain the old one.
    Surge,
    /// Replace one slot at a time, new before old.
    Rolling { slot: u32 },
}

/// A reload in progress.
#[derive(Debug, Clone)]
pub struct Reload {
    pub generation: u32,
    pub kind: ReloadKind,
    pub started: Instant,
    pub tickets: Vec<Ticket>,
    /// The next `EXTEND_TIMEOUT_USEC=` to systemd; `None` once past `budget`.
    pub extend_at: Option<Instant>,
}

impl Reload {
    /// How long this reload may legitimately take: per step (the whole pool for a surge,
    /// each slot for a rolling restart) `--ready-timeout` + `--min-uptime` +
    /// `--stop-timeout` (a coalesced reload may wait for a draining generation).
    pub fn budget(&self, cfg: &Config, workers: u32) -> Duration {
        let steps = match self.kind {
            ReloadKind::Surge => 1,
            ReloadKind::Rolling { .. } => workers.max(1),
        };
        (cfg.ready_timeout + cfg.min_uptime + cfg.stop_timeout) * steps
    }
}

/// A reload asked for while another one runs: coalesced into one more after it.
#[derive(Debug, Clone, Default)]
pub struct Queued {
    pub rolling: bool,
    pub tickets: Vec<Ticket>,
}

#[derive(Debug, Clone)]
pub struct State {
    pub cfg: Config,
    pub phase: Phase,
    /// The generation that serves (after a successful reload: the new one). Each slot
    /// runs its own `Slot::generation`, which a rolling restart moves one by one.
    pub serving_generation: u32,
    /// The highest generation number ever used (rolled-back ones included): the next
    /// one started is this plus one.
    pub newest_generation: u32,
    pub workers: Vec<Worker>,
    pub slots: Vec<Slot>,
    pub reload: Option<Reload>,
    pub queued: Option<Queued>,
    /// The last STATUS= sent upstream, to send only changes.
    pub last_status: String,
    /// The outcome of the last reload, for status output: (finished at, result).
    pub last_reload: Option<(Instant, Result<u32, String>)>,
    /// When connections were last seen (for `--exit-idle-after`).
    pub last_busy: Option<Instant>,
    /// READY=1 was sent once (a lazy supervisor is ready while it holds the sockets).
    pub announced: bool,
    /// When a worker of its slot's generation last became established (for the give-up
    /// rule after the first generation served).
    pub last_established: Option<Instant>,
    /// A worker ever sent READY=1 (decides whether errors hint at `--ready`).
    pub ready_seen: bool,
    /// The highest generation whose missing `READY=1` was already reported.
    pub hinted_generation: u32,
    /// The pending check that the serving generation accepts connections.
    pub accept_probe: Option<AcceptProbe>,
    /// The slot being recycled, if one is.
    pub recycle: Option<Recycle>,
    /// A replacement failed to start: no recycling before this (backoff) ...
    pub recycle_retry_at: Option<Instant>,
    /// ... and the backoff after the next failure.
    pub recycle_delay: Duration,
    /// With `--max-worker-memory`: the next memory sample (`None` while one is out).
    pub memory_sample_at: Option<Instant>,
    /// Seeds each worker's jittered age limit (the executor sets a random one).
    pub seed: u64,
    /// The next ping of systemd's watchdog (`Config::systemd_watchdog`).
    pub watchdog_ping_at: Option<Instant>,
    /// With `--exit-idle-after`: the next traffic sample of the sockets.
    pub traffic_sample_at: Option<Instant>,
}

/// A scheduled look at the accept queues: are connections waiting that nobody accepts?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptProbe {
    pub generation: u32,
    pub at: Instant,
    /// When the previous probe looked.
    pub prev: Option<Instant>,
    /// The gap to the next probe when this one finds nothing.
    pub interval: Duration,
    /// No probe is armed after this.
    pub until: Instant,
}

impl State {
    pub fn new(cfg: Config) -> State {
        let slots = (0..cfg.workers).map(|_| Slot::new(&cfg)).collect();
        let cfg_restart_min = cfg.restart.min;
        State {
            cfg,
            phase: Phase::Starting,
            serving_generation: 1,
            newest_generation: 1,
            workers: Vec::new(),
            slots,
            reload: None,
            queued: None,
            last_status: String::new(),
            last_reload: None,
            last_busy: None,
            announced: false,
            last_established: None,
            ready_seen: false,
            hinted_generation: 0,
            accept_probe: None,
            recycle: None,
            recycle_retry_at: None,
            recycle_delay: cfg_restart_min,
            memory_sample_at: None,
            seed: 0,
            watchdog_ping_at: None,
            traffic_sample_at: None,
        }
    }

    /// How many workers the pool should run now (one slot each): `--workers` at start,
    /// then whatever `scale` set.
    pub fn desired(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// Does `slot` run `generation` (its refills start that generation)?
    pub fn slot_runs(&self, slot: u32, generation: u32) -> bool {
        self.slots
            .get(slot as usize)
            .is_some_and(|s| s.generation == generation)
    }

    /// Is `w` of its slot's generation (not an old one draining, nor a new one being
    /// rolled out)?
    pub fn is_current(&self, w: &Worker) -> bool {
        self.slot_runs(w.slot, w.generation)
    }

    /// Is `generation` being rolled out by the reload in progress, and not yet accepted
    /// for `slot`?
    pub fn in_rollout(&self, slot: u32, generation: u32) -> bool {
        self.reload
            .as_ref()
            .is_some_and(|r| r.generation == generation)
            && !self.slot_runs(slot, generation)
    }

    pub fn worker(&self, pid: Pid) -> Option<&Worker> {
        self.workers.iter().find(|w| w.pid == pid)
    }

    pub fn worker_mut(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    /// Workers of `generation` in `slot` that are not being stopped.
    pub fn live_in(&self, generation: u32, slot: u32) -> Option<&Worker> {
        self.workers.iter().find(|w| {
            w.generation == generation
                && w.slot == slot
                && matches!(
                    w.phase,
                    WorkerPhase::Starting { .. } | WorkerPhase::Ready { .. }
                )
        })
    }

    pub fn ready_count(&self, generation: u32) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && matches!(w.phase, WorkerPhase::Ready { .. }))
            .count()
    }

    /// The earliest armed deadline, if any: the executor sleeps until then (or forever).
    pub fn next_deadline(&self) -> Option<Instant> {
        let hint = |w: &Worker| {
            (self.cfg.ready == ReadyMode::Notify && w.generation > self.hinted_generation)
                .then_some(w.started + NO_READY_HINT_AFTER)
        };
        let workers = self.workers.iter().filter_map(|w| match w.phase {
            WorkerPhase::Starting { deadline, ready_at } => {
                let first = ready_at.map_or(deadline, |r| r.min(deadline));
                Some(hint(w).map_or(first, |h| h.min(first)))
            }
            WorkerPhase::Draining { kill_at, .. } => Some(kill_at),
            WorkerPhase::Ready { since, last_ping } => {
                let watchdog = self.cfg.worker_watchdog.map(|wd| last_ping + wd);
                let established = (!w.established).then_some(since + self.cfg.min_uptime);
                // Only when a recycle could start (else the deadline may be long past).
                let age = w.recycle_at.filter(|_| self.may_recycle());
                watchdog.into_iter().chain(established).chain(age).min()
            }
            WorkerPhase::Killed { .. } => None,
        });
        let slots = self.slots.iter().filter_map(|s| s.respawn_at);
        let phase = match self.phase {
            Phase::Stopping { force_at, .. } => force_at,
            Phase::Running if self.reload.is_none() && self.queued.is_none() => self
                .cfg
                .exit_idle_after
                .and_then(|d| self.last_busy.map(|b| b + d)),
            _ => None,
        };
        let probe = match self.phase {
            Phase::Running => self.accept_probe.map(|p| p.at),
            _ => None,
        };
        let extend = self.reload.as_ref().and_then(|r| r.extend_at);
        let recycling = [
            self.recycle_retry_at,
            self.memory_sample_at,
            self.watchdog_ping_at,
            self.traffic_sample_at,
            extend,
        ];
        workers
            .chain(slots)
            .chain(phase)
            .chain(probe)
            .chain(recycling.into_iter().flatten())
            .min()
    }

    /// Could a slot start recycling now (timing aside)? Running with the whole pool
    /// established, no reload running or queued, no other recycle, no backoff pending.
    pub fn may_recycle(&self) -> bool {
        self.phase == Phase::Running
            && self.reload.is_none()
            && self.queued.is_none()
            && self.recycle.is_none()
            && self.recycle_retry_at.is_none()
            && self.slots.iter().all(|s| s.respawn_at.is_none())
            // The previous recycle's old worker (or any of the pool's) is not still draining.
            && !self.workers.iter().any(|w| {
                !w.phase.is_live()
                    && self.is_current(w)
            })
            && (0..self.desired()).all(|slot| {
                let g = self.slots[slot as usize].generation;
                self.live_in(g, slot)
                    .is_some_and(|w| w.established && matches!(w.phase, WorkerPhase::Ready { .. }))
            })
    }
}

impl State {
    /// Established workers (ready, and up for `--min-uptime` since) of their slot's
    /// current generation.
    pub fn established_count_current(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| {
                w.established && matches!(w.phase, WorkerPhase::Ready { .. }) && self.is_current(w)
            })
            .count()
    }

    /// Ready workers that belong to their slot's current generation.
    pub fn ready_count_current(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| matches!(w.phase, WorkerPhase::Ready { .. }) && self.is_current(w))
            .count()
    }

    /// The one-line STATUS= text for systemd.
    pub fn status_line(&self) -> String {
        let n = self.desired();
        let ready = self.ready_count_current();
        match (&self.phase, &self.reload) {
            (Phase::Stopping { .. }, _) => {
                format!("stopping: {} worker(s) left", self.workers.len())
            }
            (Phase::Idle, _) => "idle: no workers, waiting for a connection".to_string(),
            (Phase::Starting, _)
                if ready == 0 && self.hinted_generation >= self.serving_generation =>
            {
                format!(
                    "starting: 0/{n} workers ready (no READY=1 yet: see --ready after:DUR, --ready exec)"
                )
            }
            (Phase::Starting, _) if ready == n as usize && n > 0 => format!(
                "starting: {n}/{n} workers ready, waiting --min-uptime {}",
                human(self.cfg.min_uptime)
            ),
            (Phase::Starting, _) => format!("starting: {ready}/{n} workers ready"),
            (Phase::Running, Some(r)) => format!(
                "reloading to generation {}: {}/{n} new workers ready; {ready}/{n} serving",
                r.generation,
                self.ready_count(r.generation)
            ),
            (Phase::Running, None) => {
                let ready = ready.min(n as usize);
                let mut s = format!(
                    "{ready}/{n} workers ready, generation {}",
                    self.serving_generation
                );
                if let Some(r) = &self.recycle {
                    let _ = std::fmt::Write::write_fmt(
                        &mut s,
                        format_args!("; recycling worker {} ({})", r.slot, r.reason.kind()),
                    );
                }
                if let Some((_, Err(e))) = &self.last_reload {
                    s.push_str("; last ");
                    s.push_str(e);
                }
                s
            }
        }
    }
}

impl Worker {
    /// The fields that identify this worker in log entries.
    pub fn tag(&self) -> WorkerTag {
        WorkerTag {
            slot: self.slot,
            generation: self.generation,
            pid: Some(self.pid),
        }
    }
}

impl Slot {
    pub fn new(cfg: &Config) -> Slot {
        Slot {
            generation: 1,
            delay: cfg.restart.min,
            respawn_at: None,
            restarts: 0,
            failed_starts: 0,
            last_exit: None,
            recycles: 0,
            last_recycle: None,
        }
    }
}
