//! `clusterctl status`: a snapshot of the supervisor and its workers, as a table for humans
//! or as stable JSON (schema version 1, documented in the README). Built by the supervisor
//! from its state plus `/proc` (RSS and CPU time per worker).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::procfs;
use super::state::{Phase, State, WorkerPhase};

/// One row of the worker table.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub slot: u32,
    pub pid: Option<i32>,
    pub generation: u32,
    /// `starting`, `ready`, `draining`, `killed` or `backing-off`.
    pub state: &'static str,
    pub uptime: Option<Duration>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub status: Option<String>,
    /// Processes in the worker's tree: the worker and its descendants (a nested master
    /// such as `gunicorn -w 4` is 5).
    pub processes: Option<u32>,
    /// RSS summed over the worker's tree.
    pub tree_rss_bytes: Option<u64>,
    /// Workers of this slot replaced by recycling (`--max-worker-memory`/`-age`)...
    pub recycles: u32,
    /// ... and the last one: (how long ago, `memory` | `age`, the measured value).
    pub last_recycle: Option<(Duration, &'static str, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub pid: u32,
    /// The running binary and its version (they change with `clusterctl upgrade`).
    pub binary: String,
    pub version: String,
    pub uptime: Duration,
    pub phase: &'static str,
    pub status: String,
    pub generation: u32,
    pub workers_wanted: u32,
    /// Log lines dropped because stderr was full.
    pub log_lines_dropped: u64,
    pub sockets: Vec<(String, String)>,
    /// (seconds ago, Ok(generation) | Err(reason))
    pub last_reload: Option<(Duration, Result<u32, String>)>,
    pub workers: Vec<WorkerRow>,
}

/// Resident set size and CPU time of a process, from `/proc/PID/stat`.
fn proc_usage(pid: i32) -> (Option<u64>, Option<f64>) {
    let Some(s) = procfs::stat(pid) else {
        return (None, None);
    };
    #[allow(clippy::cast_precision_loss)]
    let cpu = (s.utime + s.stime) as f64 / procfs::clock_ticks() as f64;
    (Some(s.rss_pages * procfs::page_size()), Some(cpu))
}

/// Builds the report from the supervisor's state.
/// Parent → children, from one pass over `/proc`.
fn process_children() -> std::collections::HashMap<i32, Vec<i32>> {
    let mut map: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    for pid in procfs::all_pids() {
        if let Some(s) = procfs::stat(pid) {
            map.entry(s.ppid).or_default().push(pid);
        }
    }
    map
}

/// The descendants of `pid` (not `pid` itself), bounded.
fn descendants(children: &std::collections::HashMap<i32, Vec<i32>>, pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map_or(&[][..], Vec::as_slice) {
            if out.len() < 100_000 && c != pid && !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

pub fn report(
    state: &State,
    sockets: Vec<(String, String)>,
    started: Instant,
    now: Instant,
) -> Report {
    let children = if state.workers.is_empty() {
        std::collections::HashMap::new()
    } else {
        process_children()
    };
    let mut workers: Vec<WorkerRow> = state
        .workers
        .iter()
        .map(|w| {
            let (rss, cpu) = proc_usage(w.pid.as_raw());
            let tree = descendants(&children, w.pid.as_raw());
            let tree_rss =
                rss.map(|own| own + tree.iter().filter_map(|p| proc_usage(*p).0).sum::<u64>());
            let slot = state.slots.get(w.slot as usize);
            let current = slot.is_some_and(|s| s.generation == w.generation);
            WorkerRow {
                slot: w.slot,
                pid: Some(w.pid.as_raw()),
                generation: w.generation,
                state: match w.phase {
                    WorkerPhase::Starting { .. }
                        if state.cfg.ready == crate::config::ReadyMode::Notify
                            && now.saturating_duration_since(w.started)
                                >= crate::supervisor::state::NO_READY_HINT_AFTER =>
                    {
                        "starting (no READY=1 yet)"
                    }
                    WorkerPhase::Starting { .. } => "starting",
                    WorkerPhase::Ready { .. } => "ready",
                    WorkerPhase::Draining { .. } => "draining",
                    WorkerPhase::Killed { .. } => "killed",
                },
                uptime: Some(now.saturating_duration_since(w.started)),
                restarts: if current {
                    slot.map_or(0, |s| s.restarts)
                } else {
                    0
                },
                last_exit: if current {
                    slot.and_then(|s| s.last_exit).map(|e| e.to_string())
                } else {
                    None
                },
                rss_bytes: rss,
                cpu_seconds: cpu,
                status: w.status.clone(),
                processes: rss.map(|_| 1 + u32::try_from(tree.len()).unwrap_or(u32::MAX)),
                tree_rss_bytes: tree_rss,
                recycles: if current {
                    slot.map_or(0, |s| s.recycles)
                } else {
                    0
                },
                last_recycle: if current {
                    slot.and_then(|s| s.last_recycle.as_ref())
                        .map(|(t, r)| recycle_info(now, *t, r))
                } else {
                    None
                },
            }
        })
        .collect();
    for (i, s) in state.slots.iter().enumerate() {
        if s.respawn_at.is_some() {
            workers.push(WorkerRow {
                slot: u32::try_from(i).unwrap_or(u32::MAX),
                pid: None,
                generation: s.generation,
                state: "backing-off",
                uptime: None,
                restarts: s.restarts,
                last_exit: s.last_exit.map(|e| e.to_string()),
                rss_bytes: None,
                cpu_seconds: None,
                status: None,
                processes: None,
                tree_rss_bytes: None,
                recycles: s.recycles,
                last_recycle: s
                    .last_recycle
                    .as_ref()
                    .map(|(t, r)| recycle_info(now, *t, r)),
            });
        }
    }
    workers.sort_by_key(|w| (w.slot, w.generation));
    Report {
        pid: std::process::id(),
        binary: crate::supervisor::handover::current_binary()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        version: crate::supervisor::handover::version(),
        uptime: now.saturating_duration_since(started),
        phase: match state.phase {
            Phase::Idle => "idle",
            Phase::Starting => "starting",
            Phase::Running if state.reload.is_some() => "reloading",
            Phase::Running => "running",
            Phase::Stopping { .. } => "stopping",
        },
        status: state.status_line(),
        generation: state.serving_generation,
        workers_wanted: state.desired(),
        log_lines_dropped: crate::log::DROPPED.load(std::sync::atomic::Ordering::Relaxed),
        sockets,
        last_reload: state
            .last_reload
            .as_ref()
            .map(|(t, r)| (now.saturating_duration_since(*t), r.clone())),
        workers,
    }
}

fn recycle_info(
    now: Instant,
    at: Instant,
    r: &crate::supervisor::state::RecycleReason,
) -> (Duration, &'static str, String) {
    (now.saturating_duration_since(at), r.kind(), r.to_string())
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn human_bytes(b: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let mib = b as f64 / (1024.0 * 1024.0);
    format!("{mib:.1}M")
}

impl Report {
    /// The human-readable table.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "supervisor: pid {}, up {}s, {}",
            self.pid,
            secs(self.uptime),
            self.phase
        );
        let _ = writeln!(
            o,
            "binary:     {} (clusterctl {})",
            self.binary, self.version
        );
        let _ = writeln!(o, "status:     {}", self.status);
        let _ = writeln!(
            o,
            "generation: {} ({} workers wanted)",
            self.generation, self.workers_wanted
        );
        for (name, addr) in &self.sockets {
            let _ = writeln!(o, "socket:     {name} {addr}");
        }
        match &self.last_reload {
            None => {
                let _ = writeln!(o, "last reload: none");
            }
            Some((ago, Ok(g))) => {
                let _ = writeln!(o, "last reload: {}s ago, ok (generation {g})", secs(*ago));
            }
            Some((ago, Err(e))) => {
                let _ = writeln!(o, "last reload: {}s ago, FAILED: {e}", secs(*ago));
            }
        }
        let _ = writeln!(
            o,
            "{:>4} {:>8} {:>4} {:<11} {:>8} {:>8} {:<16} {:>5} {:>8} {:>8} {:>8} {:<18}  STATUS",
            "SLOT",
            "PID",
            "GEN",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "LAST EXIT",
            "PROCS",
            "RSS",
            "CPU",
            "RECYCLES",
            "LAST RECYCLE"
        );
        for w in &self.workers {
            let _ = writeln!(
                o,
                "{:>4} {:>8} {:>4} {:<11} {:>8} {:>8} {:<16} {:>5} {:>8} {:>8} {:>8} {:<18}  {}",
                w.slot,
                w.pid.map_or("-".into(), |p| p.to_string()),
                w.generation,
                w.state,
                w.uptime.map_or("-".into(), |u| format!("{}s", secs(u))),
                w.restarts,
                w.last_exit.as_deref().unwrap_or("-"),
                w.processes.map_or("-".into(), |n| n.to_string()),
                w.tree_rss_bytes.map_or("-".into(), human_bytes),
                w.cpu_seconds.map_or("-".into(), |c| format!("{c:.2}s")),
                w.recycles,
                w.last_recycle
                    .as_ref()
                    .map_or("-".into(), |(ago, kind, _)| format!(
                        "{kind} {}s ago",
                        secs(*ago)
                    )),
                w.status.as_deref().unwrap_or("")
            );
        }
        o
    }

    /// Stable JSON, schema version 1 (documented in the README).
    pub fn json(&self) -> String {
        let mut o = String::from("{\"version\":1,");
        let _ = write!(
            o,
            "\"supervisor\":{{\"pid\":{},\"uptime_seconds\":{},\"phase\":{},\"status\":{},\"generation\":{},\"workers_wanted\":{},\"binary\":{},\"version\":{},\"log_lines_dropped\":{}}},",
            self.pid,
            secs(self.uptime),
            jstr(self.phase),
            jstr(&self.status),
            self.generation,
            self.workers_wanted,
            jstr(&self.binary),
            jstr(&self.version),
            self.log_lines_dropped
        );
        o.push_str("\"sockets\":[");
        for (i, (n, a)) in self.sockets.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let _ = write!(o, "{{\"name\":{},\"address\":{}}}", jstr(n), jstr(a));
        }
        o.push_str("],\"last_reload\":");
        match &self.last_reload {
            None => o.push_str("null"),
            Some((ago, r)) => {
                let _ = write!(
                    o,
                    "{{\"seconds_ago\":{},\"ok\":{},\"generation\":{},\"error\":{}}}",
                    secs(*ago),
                    r.is_ok(),
                    r.as_ref().map_or("null".into(), ToString::to_string),
                    r.as_ref().err().map_or("null".into(), |e| jstr(e))
                );
            }
        }
        o.push_str(",\"workers\":[");
        for (i, w) in self.workers.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            let _ = write!(
                o,
                "{{\"slot\":{},\"pid\":{},\"generation\":{},\"state\":{},\"uptime_seconds\":{},\"restarts\":{},\"last_exit\":{},\"rss_bytes\":{},\"cpu_seconds\":{},\"status\":{},\"processes\":{},\"tree_rss_bytes\":{},\"recycles\":{},\"last_recycle\":{}}}",
                w.slot,
                w.pid.map_or("null".into(), |p| p.to_string()),
                w.generation,
                jstr(w.state),
                w.uptime.map_or("null".into(), secs),
                w.restarts,
                w.last_exit.as_deref().map_or("null".into(), jstr),
                w.rss_bytes.map_or("null".into(), |b| b.to_string()),
                w.cpu_seconds.map_or("null".into(), |c| format!("{c:.2}")),
                w.status.as_deref().map_or("null".into(), jstr),
                w.processes.map_or("null".into(), |n| n.to_string()),
                w.tree_rss_bytes.map_or("null".into(), |b| b.to_string()),
                w.recycles,
                w.last_recycle
                    .as_ref()
                    .map_or("null".into(), |(ago, kind, detail)| format!(
                        "{{\"seconds_ago\":{},\"reason\":{},\"detail\":{}}}",
                        secs(*ago),
                        jstr(kind),
                        jstr(detail)
                    ))
            );
        }
        o.push_str("]}");
        o
    }
}

/// A JSON string literal.
pub fn jstr(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(jstr("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }

    #[test]
    fn a_process_tree_is_found_through_parents() {
        let mut children = std::collections::HashMap::new();
        children.insert(10, vec![11, 12]);
        children.insert(12, vec![13]);
        children.insert(99, vec![100]);
        let mut d = descendants(&children, 10);
        d.sort_unstable();
        assert_eq!(d, vec![11, 12, 13]);
        assert!(descendants(&children, 13).is_empty());
        // Our own child shows up in a real /proc scan.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        let found = descendants(&process_children(), me);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&i32::try_from(child.id()).unwrap()));
    }

    #[test]
    fn own_process_usage_is_readable() {
        let (rss, cpu) = proc_usage(i32::try_from(std::process::id()).unwrap());
        assert!(rss.unwrap() > 0);
        assert!(cpu.is_some());
        assert_eq!(proc_usage(-5), (None, None));
    }
}
