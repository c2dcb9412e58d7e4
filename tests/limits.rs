//! Limits a careful user runs into: a very large pool, a control socket seen from another
//! user, a flood of 100 000 notify datagrams, and a worker with its own process tree.
//! Real binary, real workers (`examples/probe.rs`), real sockets and signals.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::cluster::{
    Run, Supervisor, TempDir, alive, clusterctl, exit_code, free_port, http_get, wait_for,
    wait_for_or,
};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// (pid, generation, state) of every worker row of `status --json`.
fn rows(sup: &Supervisor) -> Vec<(i32, u32, String)> {
    let (code, json, _) = sup.ctl(&["status", "--json"]);
    if code != 0 {
        return Vec::new();
    }
    crate::support::status_rows(&json)
}

/// Waits until exactly `n` workers are listed and all are ready members of `generation`;
/// returns their pids.
fn wait_pool(sup: &Supervisor, n: usize, generation: u32, timeout: Duration) -> Vec<i32> {
    wait_for_or(
        timeout,
        || {
            let r = rows(sup);
            (r.len() == n && r.iter().all(|(_, g, s)| *g == generation && s == "ready"))
                .then(|| r.iter().map(|(p, _, _)| *p).collect())
        },
        || {
            let r = rows(sup);
            format!(
                "{n} ready workers of generation {generation}; have {} rows, {} ready\n{}",
                r.len(),
                r.iter().filter(|(_, _, s)| s == "ready").count(),
                sup.log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    )
}

/// 512 workers start, serve, reload (512 new ones, the old 512 drained) and stop: no
/// process is left, the supervisor stays small.
#[test]
fn five_hundred_twelve_workers_start_reload_and_stop() {
    let dir = TempDir::new("512");
    let port = free_port();
    let mut sup = Run::new(&dir)
        .workers_on(port, 512)
        .args(&["--ready-timeout", "120s"])
        .spawn();
    let started = Instant::now();
    let first = wait_pool(&sup, 512, 1, SECS(180));
    let start_took = started.elapsed();
    assert_eq!(
        first.iter().collect::<std::collections::HashSet<_>>().len(),
        512
    );
    assert!(http_get(port, "/").is_ok());
    let reload = Instant::now();
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let second = wait_pool(&sup, 512, 2, SECS(180));
    let reload_took = reload.elapsed();
    for pid in &first {
        assert!(!second.contains(pid));
    }
    wait_for("the first 512 to be gone", SECS(60), || {
        first.iter().all(|p| !alive(*p)).then_some(())
    });
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", sup.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sup.wait_exit();
    assert_eq!(exit_code(status), 0, "{}", sup.log());
    wait_for("no worker left after stop", SECS(30), || {
        second.iter().all(|p| !alive(*p)).then_some(())
    });
    eprintln!(
        "512 workers: started in {start_took:?}, reload in {reload_took:?}, supervisor RSS {rss_kib} KiB"
    );
}

/// The control socket is owner-only (0600): another user's `status` is refused with the
/// documented exit code 69 and a hint, and the supervisor goes on answering its owner.
#[test]
fn another_users_status_is_refused_with_69() {
    if !nix::unistd::geteuid().is_root() {
        crate::support::skip("needs root to run a client as another user");
        return;
    }
    let dir = TempDir::new("other-uid");
    // The other user needs to reach the binary and the socket's directory (not the socket).
    let bin = dir.join("clusterctl");
    std::fs::copy(clusterctl(), &bin).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sup = Run::new(&dir).workers_on_free_port(1).spawn();
    wait_pool(&sup, 1, 1, SECS(30));
    let mode = std::fs::metadata(&sup.control)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let out = Command::new(&bin)
        .args(["status", "--control"])
        .arg(&sup.control)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("run as the service's user or root"), "{err}");
    let (code, _, _) = sup.ctl(&["status"]);
    assert_eq!(code, 0);
}

/// 100 000 datagrams of garbage, fake readiness, oversized messages and strangers on the
/// workers' notify socket: `status` keeps answering during the flood (the slowest answer
/// is printed), nothing a stranger sent shows up, and the worker keeps serving.
#[test]
fn a_flood_of_100k_notify_datagrams_is_shrugged_off() {
    let dir = TempDir::new("notify-flood");
    let port = free_port();
    let sup = Run::new(&dir).workers_on(port, 1).spawn();
    let worker = wait_pool(&sup, 1, 1, SECS(30))[0];
    let notify = crate::support::notify_socket_of(worker);
    let flood = std::thread::spawn(move || {
        let s = UnixDatagram::unbound().unwrap();
        s.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + SECS(180);
        let (mut sent, mut full) = (0u32, 0u32);
        for i in 0..100_000u32 {
            if Instant::now() > deadline {
                break;
            }
            let msg = crate::support::hostile_notify(i);
            // A full queue means the supervisor is behind: wait until it has read some
            // (the socket turns writable) and send the same datagram again.
            loop {
                match s.send_to(&msg, &notify) {
                    Ok(_) => {
                        sent += 1;
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(nix::libc::EAGAIN) => {
                        full += 1;
                        if Instant::now() > deadline {
                            break;
                        }
                        let mut fds = [nix::poll::PollFd::new(
                            std::os::fd::AsFd::as_fd(&s),
                            nix::poll::PollFlags::POLLOUT,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
                    }
                    Err(e) => panic!("send to the notify socket: {e}"),
                }
            }
        }
        (sent, full)
    });
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    while !flood.is_finished() {
        let asked = Instant::now();
        let (code, text, err) = sup.ctl(&["status"]);
        assert_eq!(code, 0, "status during the flood: {err}");
        assert!(!text.contains("stranger"), "{text}");
        slowest = slowest.max(asked.elapsed());
        answers += 1;
    }
    let (sent, full) = flood.join().unwrap();
    assert_eq!(sent, 100_000, "datagrams delivered within 180 s");
    assert!(answers > 0);
    assert!(http_get(port, "/").is_ok(), "{}", sup.log());
    let r = rows(&sup);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, worker, "the worker was never replaced");
    eprintln!(
        "notify flood: {sent} datagrams sent ({full} times the queue was full), {answers} status answers, slowest {slowest:?}"
    );
}

/// A worker with its own children (a wrapper that forks helpers, as many servers do):
/// `status` counts the whole tree (PROCS 3, tree RSS above the worker's own), and a stop
/// leaves none of the helpers running.
#[test]
fn a_workers_process_tree_is_counted_and_stopped_with_it() {
    let dir = TempDir::new("tree");
    let probe = crate::support::cluster::probe();
    let script = format!("sleep 1000 & sleep 1001 & exec '{}'", probe.display());
    let mut sup = Run::new(&dir)
        .workers_on_free_port(1)
        .args(&["--", "sh", "-c", &script])
        .spawn_raw();
    let worker = wait_pool(&sup, 1, 1, SECS(30))[0];
    let helpers: Vec<i32> = wait_for("the worker's two helpers", SECS(20), || {
        let kids = std::fs::read_to_string(format!("/proc/{worker}/task/{worker}/children"))
            .unwrap_or_default();
        let kids: Vec<i32> = kids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        (kids.len() == 2).then_some(kids)
    });
    let (_, json, _) = sup.ctl(&["status", "--json"]);
    let field = |key: &str| -> u64 {
        json.split(&format!("\"{key}\":"))
            .nth(1)
            .and_then(|r| r.split([',', '}']).next()?.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {json}"))
    };
    assert_eq!(field("processes"), 3, "{json}");
    assert!(field("tree_rss_bytes") > field("rss_bytes"), "{json}");
    let (_, table, _) = sup.ctl(&["status"]);
    assert!(table.contains("PROCS"), "{table}");
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(sup.wait_exit()), 0, "{}", sup.log());
    wait_for("the helpers to be gone after stop", SECS(20), || {
        helpers.iter().all(|p| !alive(*p)).then_some(())
    });
}
