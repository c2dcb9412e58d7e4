//! `clusterctl upgrade`: the supervisor re-executes a clusterctl binary in the same pid and
//! hands its whole state to the new image through an inherited memfd.
//!
//! The snapshot is text, one record a line (`KIND key=value …`, values percent-escaped),
//! in two sections, each closed by its own checksum line:
//! - the **base** section (format frozen since version 1; every version reads it): the
//!   binary, the fds handed over (notify socket, control listener, guardian pipe, waiting
//!   control clients), the listening sockets (at fds 3..), the worker count and each
//!   worker's slot, generation and pid;
//! - the **full** section, readable only by a binary of the same `VERSION`: everything in
//!   `State` (phases, timers, backoff, counters, reload and recycle in progress, tickets).
//!
//! Not in the snapshot: the workers' pidfds (close-on-exec; the new image opens one per
//! adopted worker, still its unreaped child) and the poll set, which the executor rebuilds
//! from its fds on every wait.
//!
//! Times are absolute `CLOCK_MONOTONIC` microseconds: `Instant` does not survive `execve`,
//! but the monotonic clock does (same boot, same pid).
//!
//! A new image that does not know the version, or finds the full section corrupt, resumes
//! from the base section alone: it keeps every worker (the current generation as ready and
//! established, older ones as draining), keeps the sockets and the notify socket, and
//! answers waiting `reload --wait` clients with an error (their outcome is unknown). A base
//! section that does not verify cannot be trusted with fds: the new image exits 1 (under
//! systemd, `Restart=` then starts the service afresh). See README, "Upgrading clusterctl".

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{Read, Seek, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::event::{ExitKind, Ticket};
use super::state::{
    AcceptProbe, Config, Phase, Queued, Recycle, RecycleReason, Reload, ReloadKind, Slot, State,
    StopReason, Worker, WorkerPhase,
};
use crate::sys;

/// The hand-over format this binary writes and fully reads.
///
/// 2: the typed lifecycle (per-phase data, `StopReason`), the pool's size from its slots,
/// the systemd watchdog / reload extension / traffic sample deadlines in `State`.
pub const VERSION: u32 = 2;
const MAGIC: &str = "clusterctl-handover";
/// The largest snapshot read (8192 workers need well under 2 MiB).
const MAX_SNAPSHOT: u64 = 64 << 20;

/// The version string reported by `status` and the upgrade's answer.
pub fn version() -> String {
    let suffix = option_env!("CLUSTERCTL_VERSION_SUFFIX").unwrap_or("");
    format!("{}{suffix}", env!("CARGO_PKG_VERSION"))
}

/// Percent-escapes everything but `[A-Za-z0-9._/:@+,]`, so values hold no spaces, `=`
/// or `-` (a lone `-` means "none").
pub fn escape(bytes: &[u8]) -> String {
    let mut o = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"._/:@+,".contains(&b) {
            o.push(char::from(b));
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

pub fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            o.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            o.push(b[i]);
            i += 1;
        }
    }
    Some(o)
}

/// FNV-1a, 64 bits: detects a damaged snapshot (not an attacker: the memfd is ours).
fn checksum(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `CLOCK_MONOTONIC` now, in microseconds: the clock `Instant` reads, which survives
/// `execve` (same boot).
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000
    })
}

/// Every `StopReason`, by the name it has in a snapshot.
const STOP_REASONS: &[(&str, StopReason)] = &[
    ("replaced", StopReason::Replaced),
    ("shutdown", StopReason::Shutdown),
    ("ready_timeout", StopReason::ReadyTimeout),
    ("rolled_back", StopReason::RolledBack),
    ("unwanted", StopReason::Unwanted),
    ("watchdog", StopReason::Watchdog),
    ("scaled_down", StopReason::ScaledDown),
    ("idle", StopReason::Idle),
    ("recycled", StopReason::Recycled),
    ("recycle_cancelled", StopReason::RecycleCancelled),
];

fn reason_name(r: StopReason) -> &'static str {
    STOP_REASONS
        .iter()
        .find(|(_, x)| *x == r)
        .map_or("unwanted", |(n, _)| n)
}

fn reason_named(name: &str) -> Result<StopReason, String> {
    STOP_REASONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| format!("unknown stop reason {name:?}"))
}

/// Converts between `Instant` and absolute `CLOCK_MONOTONIC` microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    now: Instant,
    mono: u64,
}

impl Clock {
    pub fn now() -> Clock {
        Clock {
            now: Instant::now(),
            mono: monotonic_usec(),
        }
    }

    pub fn usec(self, t: Instant) -> u64 {
        if t >= self.now {
            self.mono
                .saturating_add(u64::try_from((t - self.now).as_micros()).unwrap_or(u64::MAX))
        } else {
            self.mono
                .saturating_sub(u64::try_from((self.now - t).as_micros()).unwrap_or(u64::MAX))
        }
    }

    pub fn instant(self, usec: u64) -> Instant {
        if usec >= self.mono {
            self.now + Duration::from_micros(usec - self.mono)
        } else {
            self.now
                .checked_sub(Duration::from_micros(self.mono - usec))
                .unwrap_or(self.now)
        }
    }
}

/// The control listener handed over: fd, path, and the socket file's (device, inode).
pub type ControlFd = (RawFd, PathBuf, Option<(u64, u64)>);

/// What every version reads: enough to keep the workers and the sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// The binary that wrote the snapshot, and its version.
    pub from_binary: PathBuf,
    pub from_version: String,
    /// When the snapshot was written, and when the upgrade was asked for (monotonic µs).
    pub written: u64,
    pub requested: u64,
    /// When the supervisor first started (monotonic µs).
    pub started: u64,
    pub notify: (RawFd, PathBuf, Option<PathBuf>),
    pub control: Option<ControlFd>,
    pub guardian: Option<(RawFd, i32)>,
    /// Listening sockets at fds 3..: (name, address).
    pub listeners: Vec<(String, String)>,
    pub created_paths: Vec<PathBuf>,
    pub workers_wanted: u32,
    /// (slot, generation, pid)
    pub workers: Vec<(u32, u32, i32)>,
    /// Control clients waiting for an answer: (ticket, fd).
    pub waiting: Vec<(Ticket, RawFd)>,
    /// The `upgrade --wait` client, answered by the new image.
    pub client: Option<RawFd>,
    pub next_ticket: Ticket,
}

/// A decoded snapshot: the base section, and the full state's lines when this binary can
/// read them (else why not).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: u32,
    pub base: Base,
    pub full: Result<String, String>,
}

/// One `KIND k=v …` line.
struct Rec<'a> {
    kind: &'a str,
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Rec<'a> {
    fn parse(line: &'a str) -> Rec<'a> {
        let mut words = line.split(' ');
        let kind = words.next().unwrap_or("");
        let fields = words.filter_map(|w| w.split_once('=')).collect();
        Rec { kind, fields }
    }

    fn raw(&self, k: &str) -> Result<&'a str, String> {
        self.fields
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("{} record without {k}", self.kind))
    }

    fn opt(&self, k: &str) -> Result<Option<&'a str>, String> {
        self.raw(k).map(|v| (v != "-").then_some(v))
    }

    fn num<T: std::str::FromStr>(&self, k: &str) -> Result<T, String> {
        let v = self.raw(k)?;
        v.parse()
            .map_err(|_| format!("{} {k}={v:?} is not a number", self.kind))
    }

    fn opt_num<T: std::str::FromStr>(&self, k: &str) -> Result<Option<T>, String> {
        match self.opt(k)? {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{} {k}={v:?} is not a number", self.kind)),
        }
    }

    fn bytes(&self, k: &str) -> Result<Vec<u8>, String> {
        let v = self.raw(k)?;
        unescape(v).ok_or_else(|| format!("{} {k}={v:?} is badly escaped", self.kind))
    }

    fn string(&self, k: &str) -> Result<String, String> {
        String::from_utf8(self.bytes(k)?).map_err(|_| format!("{} {k} is not UTF-8", self.kind))
    }

    fn opt_string(&self, k: &str) -> Result<Option<String>, String> {
        match self.opt(k)? {
            None => Ok(None),
            Some(_) => self.string(k).map(Some),
        }
    }

    fn path(&self, k: &str) -> Result<PathBuf, String> {
        Ok(PathBuf::from(OsString::from_vec(self.bytes(k)?)))
    }

    fn opt_path(&self, k: &str) -> Result<Option<PathBuf>, String> {
        match self.opt(k)? {
            None => Ok(None),
            Some(_) => self.path(k).map(Some),
        }
    }

    fn flag(&self, k: &str) -> Result<bool, String> {
        match self.raw(k)? {
            "1" => Ok(true),
            "0" => Ok(false),
            v => Err(format!("{} {k}={v:?} is not 0 or 1", self.kind)),
        }
    }
}

/// Builds `KIND k=v …` lines.
struct Line(String);

impl Line {
    fn new(kind: &str) -> Line {
        Line(kind.to_string())
    }
    fn v(mut self, k: &str, v: impl std::fmt::Display) -> Line {
        let _ = write!(self.0, " {k}={v}");
        self
    }
    fn o(self, k: &str, v: Option<impl std::fmt::Display>) -> Line {
        match v {
            Some(v) => self.v(k, v),
            None => self.v(k, "-"),
        }
    }
    fn s(self, k: &str, v: &[u8]) -> Line {
        let e = escape(v);
        self.v(k, e)
    }
    fn b(self, k: &str, v: bool) -> Line {
        self.v(k, u8::from(v))
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// Writes the snapshot: the base section, then the full state.
pub fn encode(base: &Base, state: &State, clock: Clock) -> String {
    encode_version(VERSION, base, &encode_full(state, clock))
}

fn encode_version(version: u32, base: &Base, full: &str) -> String {
    let mut b = String::new();
    let mut push = |l: Line| {
        b.push_str(&l.0);
        b.push('\n');
    };
    let (nfd, npath, ntmp) = &base.notify;
    push(
        Line::new("B")
            .s("from_binary", path_bytes(&base.from_binary))
            .s("from_version", base.from_version.as_bytes())
            .v("written", base.written)
            .v("requested", base.requested)
            .v("started", base.started)
            .v("notify_fd", nfd)
            .s("notify_path", path_bytes(npath))
            .o("notify_tmp", ntmp.as_deref().map(|p| escape(path_bytes(p))))
            .o("control_fd", base.control.as_ref().map(|c| c.0))
            .o(
                "control_path",
                base.control.as_ref().map(|c| escape(path_bytes(&c.1))),
            )
            .o(
                "control_id",
                base.control
                    .as_ref()
                    .and_then(|c| c.2)
                    .map(|(d, i)| format!("{d}:{i}")),
            )
            .o("guardian_fd", base.guardian.map(|g| g.0))
            .o("guardian_pid", base.guardian.map(|g| g.1))
            .v("workers", base.workers_wanted)
            .o("client", base.client)
            .v("next_ticket", base.next_ticket),
    );
    for (name, addr) in &base.listeners {
        push(
            Line::new("L")
                .s("name", name.as_bytes())
                .s("address", addr.as_bytes()),
        );
    }
    for p in &base.created_paths {
        push(Line::new("C").s("path", path_bytes(p)));
    }
    for (slot, generation, pid) in &base.workers {
        push(
            Line::new("W")
                .v("slot", slot)
                .v("generation", generation)
                .v("pid", pid),
        );
    }
    for (ticket, fd) in &base.waiting {
        push(Line::new("T").v("ticket", ticket).v("fd", fd));
    }
    let mut out = format!("{MAGIC} {version}\n");
    out.push_str(&b);
    let _ = writeln!(out, "E base {:016x}", checksum(&b));
    out.push_str(full);
    let _ = writeln!(out, "E full {:016x}", checksum(full));
    out
}

fn encode_full(st: &State, clock: Clock) -> String {
    let t = |i: Instant| clock.usec(i);
    let ot = |i: Option<Instant>| i.map(t);
    let mut out = String::new();
    let mut push = |l: Line| {
        out.push_str(&l.0);
        out.push('\n');
    };
    let (phase, force_at, code) = match st.phase {
        Phase::Idle => ("idle", None, 0),
        Phase::Starting => ("starting", None, 0),
        Phase::Running => ("running", None, 0),
        Phase::Stopping { force_at, code } => ("stopping", force_at, code),
    };
    let (reload_at, reload_result) = match &st.last_reload {
        None => (None, None),
        Some((at, Ok(g))) => (Some(t(*at)), Some(format!("ok:{g}"))),
        Some((at, Err(e))) => (Some(t(*at)), Some(format!("err:{}", escape(e.as_bytes())))),
    };
    push(
        Line::new("S")
            .v("phase", phase)
            .o("force_at", ot(force_at))
            .v("code", code)
            .v("serving_generation", st.serving_generation)
            .v("newest_generation", st.newest_generation)
            .s("last_status", st.last_status.as_bytes())
            .o("reload_at", reload_at)
            .o("reload_result", reload_result)
            .o("last_busy", ot(st.last_busy))
            .b("announced", st.announced)
            .o("last_established", ot(st.last_established))
            .b("ready_seen", st.ready_seen)
            .v("hinted_generation", st.hinted_generation)
            .o("recycle_retry_at", ot(st.recycle_retry_at))
            .v("recycle_delay", us(st.recycle_delay))
            .o("memory_sample_at", ot(st.memory_sample_at))
            .v("seed", st.seed)
            .o("watchdog_ping_at", ot(st.watchdog_ping_at))
            .o("traffic_sample_at", ot(st.traffic_sample_at)),
    );
    if let Some(p) = st.accept_probe {
        push(
            Line::new("P")
                .v("generation", p.generation)
                .v("at", t(p.at))
                .o("prev", ot(p.prev))
                .v("interval", us(p.interval))
                .v("until", t(p.until)),
        );
    }
    let tickets = |ts: &[Ticket]| {
        if ts.is_empty() {
            "-".to_string()
        } else {
            ts.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        }
    };
    if let Some(r) = &st.reload {
        let (kind, slot) = match r.kind {
            ReloadKind::Surge => ("surge", None),
            ReloadKind::Rolling { slot } => ("rolling", Some(slot)),
        };
        push(
            Line::new("R")
                .v("generation", r.generation)
                .v("kind", kind)
                .o("slot", slot)
                .v("started", t(r.started))
                .o("extend_at", ot(r.extend_at))
                .v("tickets", tickets(&r.tickets)),
        );
    }
    if let Some(q) = &st.queued {
        push(
            Line::new("Q")
                .b("rolling", q.rolling)
                .v("tickets", tickets(&q.tickets)),
        );
    }
    let reason = |r: RecycleReason| match r {
        RecycleReason::Memory { rss, limit } => format!("memory:{rss}:{limit}"),
        RecycleReason::Age { age, limit } => format!("age:{}:{}", us(age), us(limit)),
    };
    if let Some(r) = st.recycle {
        push(
            Line::new("Y")
                .v("slot", r.slot)
                .v("generation", r.generation)
                .v("old", r.old)
                .o("new", r.new)
                .v("reason", reason(r.reason))
                .v("started", t(r.started)),
        );
    }
    for k in &st.slots {
        let exit = k.last_exit.map(|e| match e {
            ExitKind::Code(c) => format!("code:{c}"),
            ExitKind::Signal(n) => format!("signal:{n}"),
        });
        push(
            Line::new("K")
                .v("generation", k.generation)
                .v("delay", us(k.delay))
                .o("respawn_at", ot(k.respawn_at))
                .v("restarts", k.restarts)
                .v("failed_starts", k.failed_starts)
                .o("last_exit", exit)
                .v("recycles", k.recycles)
                .o("recycled_at", k.last_recycle.map(|(at, _)| t(at)))
                .o("recycled_why", k.last_recycle.map(|(_, r)| reason(r))),
        );
    }
    for w in &st.workers {
        // `a`, `b`: the phase's times; `reason`: why it is being stopped.
        let (phase, a, b) = match w.phase {
            WorkerPhase::Starting { deadline, ready_at } => {
                ("starting", Some(t(deadline)), ot(ready_at))
            }
            WorkerPhase::Ready { since, last_ping } => {
                ("ready", Some(t(since)), Some(t(last_ping)))
            }
            WorkerPhase::Draining { kill_at, .. } => ("draining", Some(t(kill_at)), None),
            WorkerPhase::Killed { .. } => ("killed", None, None),
        };
        push(
            Line::new("W")
                .v("slot", w.slot)
                .v("generation", w.generation)
                .v("pid", w.pid)
                .v("started", t(w.started))
                .v("phase", phase)
                .o("a", a)
                .o("b", b)
                .o("status", w.status.as_deref().map(|x| escape(x.as_bytes())))
                .b("established", w.established)
                .o("reason", w.phase.stop_reason().map(reason_name))
                .o("recycle_at", ot(w.recycle_at))
                .o("rss", w.rss)
                .v("rss_over", w.rss_over),
        );
    }
    out
}

/// Splits off one section: its lines up to `E NAME CHECKSUM`, verified.
fn section(lines: &mut std::str::Lines<'_>, name: &str) -> Result<String, String> {
    let mut text = String::new();
    for line in lines.by_ref() {
        if let Some(sum) = line.strip_prefix(&format!("E {name} ")) {
            let want = u64::from_str_radix(sum, 16)
                .map_err(|_| format!("the {name} section's checksum {sum:?} is not hex"))?;
            if checksum(&text) != want {
                return Err(format!("the {name} section is corrupt (checksum mismatch)"));
            }
            return Ok(text);
        }
        text.push_str(line);
        text.push('\n');
    }
    Err(format!("the {name} section is truncated"))
}

/// Reads a snapshot. `Err` only when the base section cannot be trusted.
pub fn decode(text: &str) -> Result<Snapshot, String> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("");
    let version: u32 = header
        .strip_prefix(MAGIC)
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("not a clusterctl hand-over snapshot (header {header:?})"))?;
    let base_text = section(&mut lines, "base")?;
    let base = decode_base(&base_text)?;
    let full = if version == VERSION {
        section(&mut lines, "full")
    } else {
        Err(format!(
            "it has hand-over format {version}; this binary reads format {VERSION}"
        ))
    };
    Ok(Snapshot {
        version,
        base,
        full,
    })
}

fn decode_base(text: &str) -> Result<Base, String> {
    let mut base: Option<Base> = None;
    let mut listeners = Vec::new();
    let mut created = Vec::new();
    let mut workers = Vec::new();
    let mut waiting = Vec::new();
    for line in text.lines() {
        let r = Rec::parse(line);
        match r.kind {
            "B" => {
                let control = match r.opt_num::<RawFd>("control_fd")? {
                    None => None,
                    Some(fd) => {
                        let id = match r.opt("control_id")? {
                            None => None,
                            Some(v) => {
                                let (d, i) = v.split_once(':').ok_or("bad control_id")?;
                                Some((
                                    d.parse().map_err(|_| "bad control_id")?,
                                    i.parse().map_err(|_| "bad control_id")?,
                                ))
                            }
                        };
                        Some((fd, r.path("control_path")?, id))
                    }
                };
                let guardian = match (
                    r.opt_num::<RawFd>("guardian_fd")?,
                    r.opt_num::<i32>("guardian_pid")?,
                ) {
                    (Some(fd), Some(pid)) => Some((fd, pid)),
                    _ => None,
                };
                base = Some(Base {
                    from_binary: r.path("from_binary")?,
                    from_version: r.string("from_version")?,
                    written: r.num("written")?,
                    requested: r.num("requested")?,
                    started: r.num("started")?,
                    notify: (
                        r.num("notify_fd")?,
                        r.path("notify_path")?,
                        r.opt_path("notify_tmp")?,
                    ),
                    control,
                    guardian,
                    listeners: Vec::new(),
                    created_paths: Vec::new(),
                    workers_wanted: r.num("workers")?,
                    workers: Vec::new(),
                    waiting: Vec::new(),
                    client: r.opt_num("client")?,
                    next_ticket: r.num("next_ticket")?,
                });
            }
            "L" => listeners.push((r.string("name")?, r.string("address")?)),
            "C" => created.push(r.path("path")?),
            "W" => workers.push((r.num("slot")?, r.num("generation")?, r.num("pid")?)),
            "T" => waiting.push((r.num("ticket")?, r.num("fd")?)),
            // Records added by later versions are skipped.
            _ => {}
        }
    }
    let mut base = base.ok_or("the base section has no B record")?;
    base.listeners = listeners;
    base.created_paths = created;
    base.workers = workers;
    base.waiting = waiting;
    // Each fd may be owned once, and none may be a listening socket's (3..3+n).
    let mut fds: Vec<RawFd> = vec![base.notify.0];
    fds.extend(base.control.as_ref().map(|c| c.0));
    fds.extend(base.guardian.map(|g| g.0));
    fds.extend(base.client);
    fds.extend(base.waiting.iter().map(|w| w.1));
    let n = RawFd::try_from(base.listeners.len()).map_err(|_| "too many listeners")?;
    for (i, fd) in fds.iter().enumerate() {
        if *fd < 3 + n || fds[..i].contains(fd) {
            return Err(format!("fd {fd} is named twice or is a listening socket's"));
        }
    }
    Ok(base)
}

/// The state a binary of this version rebuilds from the full section.
pub fn decode_full(text: &str, cfg: Config, clock: Clock) -> Result<State, String> {
    let t = |v: u64| clock.instant(v);
    let mut state = State::new(cfg);
    state.slots.clear();
    let mut seen_state = false;
    let tickets = |r: &Rec, k: &str| -> Result<Vec<Ticket>, String> {
        match r.opt(k)? {
            None => Ok(Vec::new()),
            Some(v) => v
                .split(',')
                .map(|x| x.parse().map_err(|_| format!("bad ticket {x:?}")))
                .collect(),
        }
    };
    let reason = |v: &str| -> Result<RecycleReason, String> {
        let parts: Vec<&str> = v.split(':').collect();
        let n = |i: usize| -> Result<u64, String> {
            parts
                .get(i)
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("bad recycle reason {v:?}"))
        };
        match parts.first() {
            Some(&"memory") => Ok(RecycleReason::Memory {
                rss: n(1)?,
                limit: n(2)?,
            }),
            Some(&"age") => Ok(RecycleReason::Age {
                age: Duration::from_micros(n(1)?),
                limit: Duration::from_micros(n(2)?),
            }),
            _ => Err(format!("bad recycle reason {v:?}")),
        }
    };
    for line in text.lines() {
        let r = Rec::parse(line);
        match r.kind {
            "S" => {
                seen_state = true;
                state.phase = match r.raw("phase")? {
                    "idle" => Phase::Idle,
                    "starting" => Phase::Starting,
                    "running" => Phase::Running,
                    "stopping" => Phase::Stopping {
                        force_at: r.opt_num("force_at")?.map(t),
                        code: r.num("code")?,
                    },
                    p => return Err(format!("unknown phase {p:?}")),
                };
                state.serving_generation = r.num("serving_generation")?;
                state.newest_generation = r.num("newest_generation")?;
                state.last_status = r.string("last_status")?;
                state.last_reload = match (r.opt_num("reload_at")?, r.opt("reload_result")?) {
                    (Some(at), Some(v)) => Some((
                        t(at),
                        if let Some(g) = v.strip_prefix("ok:") {
                            Ok(g.parse().map_err(|_| "bad reload_result")?)
                        } else if let Some(e) = v.strip_prefix("err:") {
                            Err(
                                String::from_utf8_lossy(&unescape(e).ok_or("bad reload_result")?)
                                    .into_owned(),
                            )
                        } else {
                            return Err("bad reload_result".into());
                        },
                    )),
                    _ => None,
                };
                state.last_busy = r.opt_num("last_busy")?.map(t);
                state.announced = r.flag("announced")?;
                state.last_established = r.opt_num("last_established")?.map(t);
                state.ready_seen = r.flag("ready_seen")?;
                state.hinted_generation = r.num("hinted_generation")?;
                state.recycle_retry_at = r.opt_num("recycle_retry_at")?.map(t);
                state.recycle_delay = Duration::from_micros(r.num("recycle_delay")?);
                state.memory_sample_at = r.opt_num("memory_sample_at")?.map(t);
                state.seed = r.num("seed")?;
                state.watchdog_ping_at = r.opt_num("watchdog_ping_at")?.map(t);
                state.traffic_sample_at = r.opt_num("traffic_sample_at")?.map(t);
            }
            "P" => {
                state.accept_probe = Some(AcceptProbe {
                    generation: r.num("generation")?,
                    at: t(r.num("at")?),
                    prev: r.opt_num("prev")?.map(t),
                    interval: Duration::from_micros(r.num("interval")?),
                    until: t(r.num("until")?),
                });
            }
            "R" => {
                state.reload = Some(Reload {
                    generation: r.num("generation")?,
                    kind: match r.raw("kind")? {
                        "surge" => ReloadKind::Surge,
                        "rolling" => ReloadKind::Rolling {
                            slot: r.num("slot")?,
                        },
                        k => return Err(format!("unknown reload kind {k:?}")),
                    },
                    started: t(r.num("started")?),
                    extend_at: r.opt_num("extend_at")?.map(t),
                    tickets: tickets(&r, "tickets")?,
                });
            }
            "Q" => {
                state.queued = Some(Queued {
                    rolling: r.flag("rolling")?,
                    tickets: tickets(&r, "tickets")?,
                });
            }
            "Y" => {
                state.recycle = Some(Recycle {
                    slot: r.num("slot")?,
                    generation: r.num("generation")?,
                    old: Pid::from_raw(r.num("old")?),
                    new: r.opt_num("new")?.map(Pid::from_raw),
                    reason: reason(r.raw("reason")?)?,
                    started: t(r.num("started")?),
                });
            }
            "K" => {
                let last_exit = match r.opt("last_exit")? {
                    None => None,
                    Some(v) => Some(match v.split_once(':') {
                        Some(("code", n)) => ExitKind::Code(n.parse().map_err(|_| "bad exit")?),
                        Some(("signal", n)) => ExitKind::Signal(n.parse().map_err(|_| "bad exit")?),
                        _ => return Err(format!("bad last_exit {v:?}")),
                    }),
                };
                let last_recycle = match (r.opt_num("recycled_at")?, r.opt("recycled_why")?) {
                    (Some(at), Some(why)) => Some((t(at), reason(why)?)),
                    _ => None,
                };
                state.slots.push(Slot {
                    generation: r.num("generation")?,
                    delay: Duration::from_micros(r.num("delay")?),
                    respawn_at: r.opt_num("respawn_at")?.map(t),
                    restarts: r.num("restarts")?,
                    failed_starts: r.num("failed_starts")?,
                    last_exit,
                    recycles: r.num("recycles")?,
                    last_recycle,
                });
            }
            "W" => {
                let first = r.opt_num("a")?.map(t);
                let second = r.opt_num("b")?.map(t);
                let need = |x: Option<Instant>| x.ok_or("worker phase without its time");
                let reason = || -> Result<StopReason, String> {
                    reason_named(
                        r.opt("reason")?
                            .ok_or("a stopping worker without a reason")?,
                    )
                };
                let phase = match r.raw("phase")? {
                    "starting" => WorkerPhase::Starting {
                        deadline: need(first)?,
                        ready_at: second,
                    },
                    "ready" => WorkerPhase::Ready {
                        since: need(first)?,
                        last_ping: need(second)?,
                    },
                    "draining" => WorkerPhase::Draining {
                        kill_at: need(first)?,
                        reason: reason()?,
                    },
                    "killed" => WorkerPhase::Killed { reason: reason()? },
                    p => return Err(format!("unknown worker phase {p:?}")),
                };
                state.workers.push(Worker {
                    slot: r.num("slot")?,
                    generation: r.num("generation")?,
                    pid: Pid::from_raw(r.num("pid")?),
                    started: t(r.num("started")?),
                    phase,
                    status: r.opt_string("status")?,
                    established: r.flag("established")?,
                    recycle_at: r.opt_num("recycle_at")?.map(t),
                    rss: r.opt_num("rss")?,
                    rss_over: r.num("rss_over")?,
                });
            }
            k => return Err(format!("unknown record {k:?} in the full section")),
        }
    }
    if !seen_state {
        return Err("the full section has no S record".into());
    }
    // The pool's size is its slots (`State::desired`, changed by `scale`).
    if state.slots.is_empty() && !state.workers.is_empty() {
        return Err("workers but no slots".into());
    }
    let desired = state.desired();
    if state
        .workers
        .iter()
        .any(|w| w.slot >= desired && w.phase.is_live())
    {
        return Err("a live worker's slot is out of range".into());
    }
    Ok(state)
}

/// The state from the base section alone (a snapshot of another version, or a corrupt
/// full section): the current generation's workers are taken as ready and established,
/// older ones as draining (their stop signal was sent; SIGKILL after `--stop-timeout`).
pub fn state_from_base(base: &Base, cfg: Config, now: Instant) -> State {
    let stop_timeout = cfg.stop_timeout;
    let mut state = State::new(cfg);
    // The pool's size as `scale` left it, not `--workers`.
    let fresh = Slot::new(&state.cfg);
    state.slots.resize(base.workers_wanted as usize, fresh);
    let generation = base.workers.iter().map(|w| w.1).max().unwrap_or(1);
    state.serving_generation = generation;
    state.newest_generation = generation;
    state.phase = Phase::Running;
    state.announced = true;
    state.ready_seen = true;
    state.hinted_generation = generation;
    for slot in &mut state.slots {
        slot.generation = generation;
    }
    for &(slot, g, pid) in &base.workers {
        let current = g == generation && slot < base.workers_wanted;
        state.workers.push(Worker {
            slot,
            generation: g,
            pid: Pid::from_raw(pid),
            started: now,
            phase: if current {
                WorkerPhase::Ready {
                    since: now,
                    last_ping: now,
                }
            } else {
                WorkerPhase::Draining {
                    kill_at: now + stop_timeout,
                    reason: StopReason::Replaced,
                }
            },
            status: None,
            established: true,
            recycle_at: None,
            rss: None,
            rss_over: 0,
        });
    }
    // An empty slot is refilled at once.
    for (i, s) in state.slots.iter_mut().enumerate() {
        let filled = base
            .workers
            .iter()
            .any(|w| w.0 as usize == i && w.1 == generation);
        if !filled {
            s.respawn_at = Some(now);
        }
    }
    state
}

/// Writes `text` into a fresh memfd, rewound, to be inherited by the new image.
pub fn to_memfd(text: &str) -> std::io::Result<OwnedFd> {
    let fd = sys::memfd(c"clusterctl-handover")?;
    let mut f = std::fs::File::from(fd);
    f.write_all(text.as_bytes())?;
    f.rewind()?;
    Ok(f.into())
}

/// Reads the snapshot from the inherited fd (and closes it).
pub fn read_fd(fd: RawFd) -> Result<String, String> {
    let owned = sys::adopt_fd(fd).map_err(|e| format!("cannot take the snapshot's fd: {e}"))?;
    let mut f = std::fs::File::from(owned);
    f.rewind()
        .map_err(|e| format!("cannot rewind fd {fd}: {e}"))?;
    let mut text = String::new();
    f.take(MAX_SNAPSHOT)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the snapshot: {e}"))?;
    Ok(text)
}

/// The argv for the new image: ours with `--resume-from FD` after the `run` subcommand
/// (and any previous `--resume-from` dropped).
pub fn resume_argv(argv: &[OsString], fd: RawFd) -> Result<Vec<OsString>, String> {
    let mut out = Vec::with_capacity(argv.len() + 1);
    let mut inserted = false;
    let mut after_dashdash = false;
    let mut skip = false;
    for (i, a) in argv.iter().enumerate() {
        if skip {
            skip = false;
            continue;
        }
        if !after_dashdash && i > 0 {
            if a == "--" {
                after_dashdash = true;
            } else if a == "--resume-from" {
                skip = true;
                continue;
            } else if a.as_bytes().starts_with(b"--resume-from=") {
                continue;
            }
        }
        out.push(a.clone());
        if !inserted && !after_dashdash && i > 0 && a == "run" {
            out.push(format!("--resume-from={fd}").into());
            inserted = true;
        }
    }
    if inserted {
        Ok(out)
    } else {
        Err("cannot find the `run` subcommand in the supervisor's command line".into())
    }
}

/// The binary to execute: `--binary`, or the one we were started from, re-resolved (a
/// package upgrade replaces the file: `/proc/self/exe` then ends in " (deleted)").
pub fn target_binary(requested: Option<&Path>) -> Result<PathBuf, String> {
    let path = match requested {
        Some(p) => p.to_path_buf(),
        None => current_binary()?,
    };
    let meta =
        std::fs::metadata(&path).map_err(|e| format!("cannot execute {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "cannot execute {}: not a regular file",
            path.display()
        ));
    }
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
        return Err(format!(
            "cannot execute {}: Permission denied (no execute bit)",
            path.display()
        ));
    }
    Ok(path)
}

/// Runs `BINARY upgrade --help` (at most 10 s): a binary that cannot start here (wrong
/// architecture, a missing shared library) or predates `clusterctl upgrade` (it would
/// reject `--resume-from` and exit, taking the workers with it) is refused before the
/// exec. Blocks the event loop for as long as that takes (milliseconds); the workers serve
/// meanwhile.
pub fn preflight(binary: &Path) -> Result<(), String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(binary)
        .args(["upgrade", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot execute {}: {e}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => {
                return Err(format!(
                    "{} cannot take over (`{} upgrade --help` failed: {s}): is it a clusterctl \
                     with `upgrade` support, for this machine?",
                    binary.display(),
                    binary.display()
                ));
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{} upgrade --help` did not finish within 10s",
                    binary.display()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {}: {e}", binary.display())),
        }
    }
}

/// The path of the running binary on disk.
pub fn current_binary() -> Result<PathBuf, String> {
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
    let bytes = exe.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(b) => PathBuf::from(OsString::from_vec(b.to_vec())),
        None => exe,
    })
}

#[cfg(test)]
#[allow(clippy::unchecked_time_subtraction)]
mod tests {
    use super::*;
    use crate::config::{ReadyMode, RestartDelay};
    use crate::supervisor::event::{Action, Event};
    use nix::sys::signal::Signal;

    fn cfg(workers: u32) -> Config {
        Config {
            workers,
            ready: ReadyMode::Notify,
            ready_timeout: Duration::from_secs(60),
            restart: RestartDelay::default(),
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            worker_watchdog: Some(Duration::from_secs(3)),
            exit_idle_after: None,
            lazy: false,
            min_uptime: Duration::from_secs(1),
            max_worker_memory: Some(1 << 30),
            max_worker_age: None,
            rolling: false,
            systemd_watchdog: Some(Duration::from_secs(20)),
        }
    }

    fn base() -> Base {
        Base {
            from_binary: PathBuf::from("/usr/bin/clusterctl with space"),
            from_version: "0.1.0".into(),
            written: 5_000_000,
            requested: 4_990_000,
            started: 1_000_000,
            notify: (10, PathBuf::from("/run/app/notify.1.sock"), None),
            control: Some((11, PathBuf::from("/run/app/control.sock"), Some((25, 77)))),
            guardian: Some((12, 4242)),
            listeners: vec![
                ("web".into(), "127.0.0.1:8000".into()),
                ("admin=x".into(), "unix:/run/a b".into()),
            ],
            created_paths: vec![PathBuf::from("/run/a b")],
            workers_wanted: 2,
            workers: vec![(0, 2, 100), (1, 2, 101), (0, 1, 90)],
            waiting: vec![(7, 13)],
            client: Some(14),
            next_ticket: 9,
        }
    }

    /// A state with every optional part set.
    fn busy_state(now: Instant) -> State {
        let mut s = State::new(cfg(2));
        s.phase = Phase::Running;
        s.serving_generation = 2;
        s.newest_generation = 3;
        s.last_status = "2 workers ready, reloading".into();
        s.last_reload = Some((
            now - Duration::from_secs(30),
            Err("no READY=1 in 60s".into()),
        ));
        s.announced = true;
        s.ready_seen = true;
        s.hinted_generation = 3;
        s.watchdog_ping_at = Some(now + Duration::from_secs(7));
        s.traffic_sample_at = Some(now + Duration::from_millis(700));
        s.seed = 0xdead_beef;
        s.recycle_retry_at = Some(now + Duration::from_secs(4));
        s.memory_sample_at = Some(now + Duration::from_secs(5));
        s.accept_probe = Some(AcceptProbe {
            generation: 2,
            at: now + Duration::from_secs(2),
            prev: None,
            interval: Duration::from_secs(4),
            until: now + Duration::from_secs(600),
        });
        s.reload = Some(Reload {
            generation: 3,
            kind: ReloadKind::Rolling { slot: 1 },
            started: now - Duration::from_secs(1),
            tickets: vec![5, 6],
            extend_at: Some(now + Duration::from_secs(4)),
        });
        s.queued = Some(Queued {
            rolling: false,
            tickets: vec![],
        });
        s.recycle = Some(Recycle {
            slot: 0,
            generation: 2,
            old: Pid::from_raw(100),
            new: None,
            reason: RecycleReason::Memory {
                rss: 2 << 30,
                limit: 1 << 30,
            },
            started: now,
        });
        s.slots[0].generation = 2;
        s.slots[0].restarts = 4;
        s.slots[0].last_exit = Some(ExitKind::Signal(9));
        s.slots[0].respawn_at = Some(now + Duration::from_millis(300));
        s.slots[1].last_recycle = Some((
            now - Duration::from_secs(3600),
            RecycleReason::Age {
                age: Duration::from_secs(7200),
                limit: Duration::from_secs(6000),
            },
        ));
        s.workers.push(Worker {
            slot: 0,
            generation: 2,
            pid: Pid::from_raw(100),
            started: now - Duration::from_secs(100),
            phase: WorkerPhase::Ready {
                since: now - Duration::from_secs(99),
                last_ping: now - Duration::from_millis(500),
            },
            status: Some("serving = fine".into()),
            established: true,
            recycle_at: Some(now + Duration::from_secs(3600)),
            rss: Some(123_456),
            rss_over: 1,
        });
        s.workers.push(Worker {
            slot: 1,
            generation: 3,
            pid: Pid::from_raw(102),
            started: now,
            phase: WorkerPhase::Starting {
                deadline: now + Duration::from_secs(60),
                ready_at: Some(now + Duration::from_secs(1)),
            },
            status: None,
            established: false,
            recycle_at: None,
            rss: None,
            rss_over: 0,
        });
        s.workers.push(Worker {
            slot: 0,
            generation: 1,
            pid: Pid::from_raw(90),
            started: now - Duration::from_secs(500),
            phase: WorkerPhase::Draining {
                kill_at: now + Duration::from_secs(9),
                reason: StopReason::Replaced,
            },
            status: None,
            established: true,
            recycle_at: None,
            rss: None,
            rss_over: 0,
        });
        s
    }

    /// Instants survive within the clock's microsecond resolution.
    fn close(a: Instant, b: Instant) -> bool {
        let d = if a > b { a - b } else { b - a };
        d < Duration::from_millis(2)
    }

    #[test]
    fn the_whole_state_round_trips() {
        let clock = Clock::now();
        let now = clock.now;
        let state = busy_state(now);
        let text = encode(&base(), &state, clock);
        let snap = decode(&text).unwrap();
        assert_eq!(snap.version, VERSION);
        assert_eq!(snap.base, base());
        let back = decode_full(snap.full.as_ref().unwrap(), cfg(2), Clock::now()).unwrap();
        // Everything but Instants compares exactly; Instants within the clock's resolution.
        assert_eq!(back.workers.len(), 3);
        assert_eq!(back.last_status, state.last_status);
        assert_eq!(back.seed, state.seed);
        assert_eq!(back.serving_generation, 2);
        assert_eq!(back.newest_generation, 3);
        assert_eq!(back.hinted_generation, 3);
        assert_eq!(back.desired(), 2);
        assert!(close(
            back.watchdog_ping_at.unwrap(),
            state.watchdog_ping_at.unwrap()
        ));
        assert!(close(
            back.traffic_sample_at.unwrap(),
            state.traffic_sample_at.unwrap()
        ));
        assert!(close(
            back.reload.as_ref().unwrap().extend_at.unwrap(),
            state.reload.as_ref().unwrap().extend_at.unwrap()
        ));
        assert_eq!(back.reload.as_ref().unwrap().tickets, vec![5, 6]);
        assert_eq!(
            back.reload.as_ref().unwrap().kind,
            ReloadKind::Rolling { slot: 1 }
        );
        assert!(back.queued.as_ref().unwrap().tickets.is_empty());
        assert_eq!(back.recycle.unwrap().reason, state.recycle.unwrap().reason);
        assert_eq!(back.slots[0].last_exit, Some(ExitKind::Signal(9)));
        assert_eq!(back.slots[0].restarts, 4);
        assert_eq!(
            back.slots[1].last_recycle.unwrap().1,
            state.slots[1].last_recycle.unwrap().1
        );
        assert!(close(
            back.slots[1].last_recycle.unwrap().0,
            state.slots[1].last_recycle.unwrap().0
        ));
        assert_eq!(
            back.last_reload.as_ref().unwrap().1,
            Err("no READY=1 in 60s".into())
        );
        for (a, b) in back.workers.iter().zip(&state.workers) {
            assert_eq!((a.slot, a.generation, a.pid), (b.slot, b.generation, b.pid));
            assert_eq!(a.status, b.status);
            assert_eq!(a.phase.stop_reason(), b.phase.stop_reason());
            assert_eq!(
                (a.rss, a.rss_over, a.established),
                (b.rss, b.rss_over, b.established)
            );
            assert!(close(a.started, b.started));
            match (a.phase, b.phase) {
                (
                    WorkerPhase::Starting { deadline, ready_at },
                    WorkerPhase::Starting {
                        deadline: d2,
                        ready_at: r2,
                    },
                ) => {
                    assert!(close(deadline, d2));
                    assert!(close(ready_at.unwrap(), r2.unwrap()));
                }
                (
                    WorkerPhase::Ready { since, last_ping },
                    WorkerPhase::Ready {
                        since: s2,
                        last_ping: p2,
                    },
                ) => {
                    assert!(close(since, s2));
                    assert!(close(last_ping, p2));
                }
                (
                    WorkerPhase::Draining { kill_at, reason },
                    WorkerPhase::Draining {
                        kill_at: k2,
                        reason: r2,
                    },
                ) => {
                    assert!(close(kill_at, k2));
                    assert_eq!(reason, r2);
                }
                (x, y) => panic!("phase {x:?} came back as {y:?}"),
            }
        }
        // The armed deadlines are the same moments: the timers continue, not restart.
        assert!(close(
            back.next_deadline().unwrap(),
            state.next_deadline().unwrap()
        ));
        // Encoding the decoded state again gives the same text (up to the clock's µs).
        let again = encode(&base(), &back, clock);
        assert_eq!(again.lines().count(), text.lines().count());
    }

    #[test]
    fn an_upgrade_is_an_action_unless_the_supervisor_stops() {
        let now = Instant::now();
        let mut s = busy_state(now);
        let ask = |ticket| Event::Upgrade {
            ticket,
            wait: true,
            binary: Some(PathBuf::from("/x")),
        };
        let out = super::super::handle(&mut s, ask(4), now);
        assert!(out.contains(&Action::Upgrade {
            ticket: 4,
            wait: true,
            binary: Some(PathBuf::from("/x")),
        }));
        s.phase = Phase::Stopping {
            force_at: None,
            code: 0,
        };
        let out = super::super::handle(&mut s, ask(5), now);
        assert!(
            out.iter().any(|a| matches!(a, Action::Answer { ticket: 5, result: Err(e) } if e.contains("stopping"))),
            "{out:?}"
        );
        assert!(!out.iter().any(|a| matches!(a, Action::Upgrade { .. })));
    }

    #[test]
    fn every_stop_reason_has_a_name() {
        for (name, r) in STOP_REASONS {
            assert_eq!(reason_named(name), Ok(*r));
            assert_eq!(reason_name(*r), *name);
        }
        assert!(reason_named("bored").is_err());
    }

    #[test]
    fn time_that_passed_during_the_exec_is_not_given_back() {
        let c1 = Clock::now();
        let deadline = c1.now + Duration::from_secs(5);
        let v = c1.usec(deadline);
        // The new image's clock, 1.5 s later on the same monotonic clock.
        let c2 = Clock {
            now: c1.now + Duration::from_millis(1500),
            mono: c1.mono + 1_500_000,
        };
        assert!(close(c2.instant(v), deadline));
        assert_eq!(c2.instant(v) - c2.now, Duration::from_millis(3500));
    }

    #[test]
    fn an_unknown_version_falls_back_to_the_base_section() {
        let clock = Clock::now();
        let text = encode_version(99, &base(), "X future=1\n");
        let snap = decode(&text).unwrap();
        assert_eq!(snap.version, 99);
        assert!(snap.full.unwrap_err().contains("format 99"));
        let s = state_from_base(&snap.base, cfg(5), clock.now);
        assert_eq!(s.desired(), 2, "the pool's size comes from the snapshot");
        assert_eq!(s.serving_generation, 2);
        let ready: Vec<i32> = s
            .workers
            .iter()
            .filter(|w| matches!(w.phase, WorkerPhase::Ready { .. }))
            .map(|w| w.pid.as_raw())
            .collect();
        assert_eq!(ready, vec![100, 101]);
        let old = s.worker(Pid::from_raw(90)).unwrap();
        assert!(matches!(old.phase, WorkerPhase::Draining { .. }));
        assert!(s.slots.iter().all(|k| k.respawn_at.is_none()));
    }

    #[test]
    fn a_missing_slot_is_refilled_after_a_fallback() {
        let mut b = base();
        b.workers = vec![(1, 2, 101)];
        let now = Instant::now();
        let s = state_from_base(&b, cfg(2), now);
        assert_eq!(s.slots[0].respawn_at, Some(now));
        assert_eq!(s.slots[1].respawn_at, None);
    }

    #[test]
    fn a_corrupt_full_section_falls_back_and_a_corrupt_base_is_refused() {
        let clock = Clock::now();
        let text = encode(&base(), &busy_state(clock.now), clock);
        let damaged = text.replacen("phase=ready", "phase=reaDy", 1);
        let snap = decode(&damaged).unwrap();
        assert!(snap.full.unwrap_err().contains("corrupt"));
        assert_eq!(snap.base.workers.len(), 3);
        let damaged = text.replacen("pid=101", "pid=999", 1);
        assert!(
            decode(&damaged)
                .unwrap_err()
                .contains("base section is corrupt")
        );
        assert!(
            decode("garbage\n")
                .unwrap_err()
                .contains("not a clusterctl")
        );
        assert!(decode("").is_err());
    }

    #[test]
    fn a_truncated_snapshot_is_detected() {
        let clock = Clock::now();
        let text = encode(&base(), &busy_state(clock.now), clock);
        let cut_full = &text[..text.len() - 10];
        assert!(
            decode(cut_full)
                .unwrap()
                .full
                .unwrap_err()
                .contains("checksum")
        );
        let at_base_end = text.find("E base").unwrap();
        assert!(
            decode(&text[..at_base_end])
                .unwrap_err()
                .contains("truncated")
        );
        let no_full_end = &text[..text.find("E full").unwrap()];
        assert!(
            decode(no_full_end)
                .unwrap()
                .full
                .unwrap_err()
                .contains("truncated")
        );
    }

    #[test]
    fn an_fd_named_twice_is_refused() {
        let clock = Clock::now();
        let mut b = base();
        b.client = Some(10);
        let text = encode(&b, &State::new(cfg(2)), clock);
        assert!(decode(&text).unwrap_err().contains("fd 10"));
        let mut b = base();
        b.client = Some(4);
        let text = encode(&b, &State::new(cfg(2)), clock);
        assert!(decode(&text).unwrap_err().contains("listening"));
    }

    #[test]
    fn escaping_round_trips() {
        for s in [&b""[..], b"a b=c-d%\n\xff", b"/usr/bin/clusterctl"] {
            assert_eq!(unescape(&escape(s)).unwrap(), s);
            assert!(!escape(s).contains([' ', '=', '-', '\n']));
        }
        assert_eq!(unescape("%4"), None);
        assert_eq!(unescape("%zz"), None);
    }

    #[test]
    fn resume_argv_goes_after_run_and_replaces_an_old_one() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let argv = a(&[
            "clusterctl",
            "run",
            "--workers",
            "2",
            "--",
            "run",
            "--resume-from=1",
        ]);
        assert_eq!(
            resume_argv(&argv, 7).unwrap(),
            a(&[
                "clusterctl",
                "run",
                "--resume-from=7",
                "--workers",
                "2",
                "--",
                "run",
                "--resume-from=1"
            ])
        );
        let again = resume_argv(&resume_argv(&argv, 7).unwrap(), 8).unwrap();
        assert_eq!(again, resume_argv(&argv, 8).unwrap());
        let spaced = a(&["c", "run", "--resume-from", "5", "--", "x"]);
        assert_eq!(
            resume_argv(&spaced, 6).unwrap(),
            a(&["c", "run", "--resume-from=6", "--", "x"])
        );
        assert!(resume_argv(&a(&["c", "status"]), 3).is_err());
    }

    #[test]
    fn a_snapshot_travels_through_a_memfd() {
        use std::os::fd::IntoRawFd;
        let raw = to_memfd("hello\n").unwrap().into_raw_fd();
        assert_eq!(read_fd(raw).unwrap(), "hello\n");
    }
}
