//! `clusterctl run` end to end: the real binary, real probe workers, real sockets and real
//! signals (issue 2), plus reload, status and scale over the control socket.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::cluster::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn workers_share_one_socket_and_get_a_clean_environment() {
    let dir = TempDir::new("share");
    let port = free_port();
    let sup = Run::new(&dir)
        .workers_on(port, 3)
        // Leaks that must not reach workers: systemd's variables meant for the supervisor.
        .env("WATCHDOG_USEC", "1000000000")
        .env("WATCHDOG_PID", "1")
        .spawn();
    let reports = sup.wait_workers(3, 1);
    for (slot, r) in reports.iter().enumerate() {
        assert_eq!(
            r["listen_pid"], r["pid"],
            "LISTEN_PID is the worker's own pid: {r:?}"
        );
        assert_eq!(r["listen_fds"], "1");
        assert_eq!(r["listen_fdnames"], "listen0");
        assert_eq!(r["worker_id"], slot.to_string());
        assert_eq!(r["cluster_workers"], "3");
        assert_eq!(
            r["fds"], "0,1,2,3",
            "only stdio and the socket are inherited"
        );
        assert_eq!(
            r["cloexec"], "",
            "the socket is inherited without FD_CLOEXEC"
        );
        assert_eq!(r["sigblk"], "0000000000000000", "empty signal mask");
        assert_eq!(r["sigign"], "0000000000000000", "default dispositions");
        assert_eq!(r["pgid"], r["pid"], "own process group");
        assert_eq!(r["ppid"], sup.pid().to_string());
        assert_eq!(
            r["watchdog_usec"], "",
            "systemd's watchdog is the supervisor's"
        );
        assert!(
            r["notify_socket"].starts_with('/'),
            "NOTIFY_SOCKET is the supervisor's own"
        );
        assert_eq!(r[&"sockname.3".to_string()], format!("127.0.0.1:{port}"));
    }
    let mut seen = HashSet::new();
    for _ in 0..300 {
        let body = http_get(port, "/").unwrap();
        seen.insert(body.split_whitespace().next().unwrap().to_string());
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "three distinct worker pids answer: {seen:?}");
}

#[test]
fn named_sockets_arrive_in_order() {
    let dir = TempDir::new("named");
    let port = free_port();
    let unix = dir.join("admin.sock");
    let sup = Run::new(&dir)
        .args(&[
            "--listen",
            &format!("web=127.0.0.1:{port}"),
            "--listen",
            &format!("admin=unix:{}", unix.display()),
            "--workers",
            "1",
        ])
        .spawn();
    let r = &sup.wait_workers(1, 1)[0];
    assert_eq!(r["listen_fds"], "2");
    assert_eq!(r["listen_fdnames"], "web:admin");
    assert_eq!(r["fds"], "0,1,2,3,4");
    assert_eq!(r["sockname.3"], format!("127.0.0.1:{port}"));
    assert_eq!(r["sockname.4"], unix.display().to_string());
    assert!(http_get(port, "/").unwrap().contains("name=web"));
}

#[test]
fn ready_goes_upstream_once_all_workers_are_ready_from_the_supervisor_pid() {
    let dir = TempDir::new("ready");
    let systemd = FakeSystemd::new(&dir);
    std::fs::write(dir.join("mode.2"), "ready-after:700").unwrap();
    let sup = Run::new(&dir)
        .workers_on_free_port(3)
        .env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .spawn();
    let got = systemd.until("READY=1", SECS(20));
    let ready_at = monotonic_ns();
    let (pid, text) = got.last().unwrap();
    assert_eq!(*pid, sup.pid(), "READY=1 comes from the supervisor itself");
    assert!(text.contains("STATUS=3/3 workers ready"), "{text:?}");
    let slot2 = starts(&dir.0)
        .into_iter()
        .find(|s| s.1 == 2)
        .expect("slot 2 started");
    assert!(
        ready_at >= slot2.3 + 700_000_000,
        "READY=1 only after the slow worker (started {} ns, ready seen {ready_at} ns)",
        slot2.3
    );
    for (_, t) in &got[..got.len() - 1] {
        assert!(!t.contains("READY=1"));
    }
    // The datagram the state machine sends on the way: progress.
    assert!(
        got.iter()
            .any(|(_, t)| t.contains("STATUS=starting: 2/3 workers ready")),
        "{got:?}"
    );
}

#[test]
fn killed_worker_is_replaced_in_its_slot_with_growing_backoff() {
    let dir = TempDir::new("crash");
    let sup = Run::new(&dir)
        .workers_on_free_port(2)
        .args(&["--restart-delay", "200ms..5s"])
        .spawn();
    let before = sup.wait_workers(2, 1);
    sup.wait_log("all 2 workers ready");
    let victim: i32 = before[1]["pid"].parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let after = wait_for("slot 1 refilled", SECS(20), || {
        let w = sup.wait_workers(2, 1);
        (w[1]["pid"] != before[1]["pid"]).then_some(w)
    });
    assert_eq!(after[0]["pid"], before[0]["pid"], "slot 0 untouched");
    assert_eq!(after[1]["worker_id"], "1");
    sup.wait_log("exited unexpectedly (signal SIGKILL)");
    // From now on slot 1 crashes at boot, before READY=1: the gaps between its starts grow
    // (a worker that was ready, like the one killed here, is replaced at once).
    std::fs::write(dir.join("mode.1"), "crash").unwrap();
    let victim: i32 = after[1]["pid"].parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let slot1 = wait_for("4 more starts of slot 1", SECS(30), || {
        let s: Vec<u64> = starts(&dir.0)
            .into_iter()
            .filter(|s| s.1 == 1)
            .map(|s| s.3)
            .collect();
        (s.len() >= 7).then_some(s)
    });
    let gaps: Vec<u64> = slot1
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    // Delays 200, 400, 800, 1600 ms after the crash, each one at least double the last.
    let tail = &gaps[gaps.len() - 3..];
    assert!(
        tail[0] >= 400 && tail[1] >= 800 && tail[2] >= 1600,
        "gaps {gaps:?} ms"
    );
    assert!(
        alive(before[0]["pid"].parse().unwrap()),
        "the healthy worker keeps running"
    );
}

#[test]
fn sigterm_stops_everything_and_leaves_no_process_behind() {
    let dir = TempDir::new("term");
    std::fs::write(dir.join("mode"), "fork-child").unwrap();
    let mut sup = Run::new(&dir).workers_on_free_port(2).spawn();
    let reports = sup.wait_workers(2, 1);
    let mut pids: Vec<i32> = reports.iter().map(|r| r["pid"].parse().unwrap()).collect();
    pids.extend(
        reports
            .iter()
            .map(|r| r["child_pid"].parse::<i32>().unwrap()),
    );
    assert!(pids.iter().all(|p| alive(*p)));
    sup.signal(Signal::SIGTERM);
    assert_eq!(exit_code(sup.wait_exit()), 0, "{}", sup.log());
    wait_for("workers and their children gone", SECS(10), || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    let log = sup.log();
    assert!(log.contains("stopping 2 worker(s) with SIGTERM"), "{log}");
}

#[test]
fn worker_ignoring_the_stop_signal_is_killed_after_stop_timeout() {
    let dir = TempDir::new("stubborn");
    std::fs::write(dir.join("mode"), "ignore-term").unwrap();
    let mut sup = Run::new(&dir)
        .workers_on_free_port(1)
        .args(&["--stop-timeout", "500ms"])
        .spawn();
    let pid: i32 = sup.wait_workers(1, 1)[0]["pid"].parse().unwrap();
    // Ready means the probe has set up its signal handling (it ignores SIGTERM from then).
    sup.wait_log("all 1 workers ready");
    sup.signal(Signal::SIGTERM);
    assert_eq!(exit_code(sup.wait_exit()), 0);
    assert!(!alive(pid));
    assert!(
        sup.log().contains("did not exit within 500ms"),
        "{}",
        sup.log()
    );
}

#[test]
fn second_sigint_kills_at_once() {
    let dir = TempDir::new("twice");
    std::fs::write(dir.join("mode"), "ignore-term").unwrap();
    let mut sup = Run::new(&dir).workers_on_free_port(2).spawn();
    sup.wait_workers(2, 1);
    sup.wait_log("all 2 workers ready");
    sup.signal(Signal::SIGINT);
    sup.wait_log("stopping 2 worker(s)");
    sup.signal(Signal::SIGINT);
    assert_eq!(exit_code(sup.wait_exit()), 0);
    assert!(sup.log().contains("second stop request"));
}

#[test]
fn sigkilled_supervisor_leaves_no_orphan() {
    let dir = TempDir::new("orphan");
    let mut sup = Run::new(&dir).workers_on_free_port(3).spawn();
    let pids: Vec<i32> = sup
        .wait_workers(3, 1)
        .iter()
        .map(|r| r["pid"].parse().unwrap())
        .collect();
    sup.signal(Signal::SIGKILL);
    sup.wait_exit();
    wait_for("workers to die with their supervisor", SECS(10), || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn first_generation_that_never_gets_ready_fails_with_the_reason() {
    let dir = TempDir::new("boot-crash");
    std::fs::write(dir.join("mode"), "crash").unwrap();
    let mut sup = Run::new(&dir)
        .workers_on_free_port(2)
        .args(&["--restart-delay", "10ms..50ms"])
        .spawn();
    assert_eq!(exit_code(sup.wait_exit()), 1, "{}", sup.log());
    let log = sup.log();
    assert!(
        log.contains("failed to start 3 times") && log.contains("exit code 3"),
        "{log}"
    );
}

#[test]
fn worker_not_ready_in_time_is_killed_and_retried() {
    let dir = TempDir::new("slow");
    std::fs::write(dir.join("mode"), "never-ready").unwrap();
    let mut sup = Run::new(&dir)
        .workers_on_free_port(1)
        .args(&["--ready-timeout", "300ms", "--restart-delay", "10ms"])
        .spawn();
    assert_eq!(exit_code(sup.wait_exit()), 1);
    assert!(
        sup.log().contains("was not ready within 300ms"),
        "{}",
        sup.log()
    );
    assert_eq!(starts(&dir.0).len(), 3, "three attempts");
}

#[test]
fn readiness_from_a_child_process_counts_for_the_worker() {
    let dir = TempDir::new("notify-child");
    std::fs::write(dir.join("mode"), "notify-child").unwrap();
    let systemd = FakeSystemd::new(&dir);
    let _sup = Run::new(&dir)
        .workers_on_free_port(2)
        .env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .spawn();
    systemd.until("READY=1", SECS(20));
}

#[test]
fn garbage_and_strangers_on_the_notify_socket_are_ignored() {
    let dir = TempDir::new("garbage");
    std::fs::write(dir.join("mode.0"), "notify-garbage").unwrap();
    std::fs::write(dir.join("mode.1"), "never-ready").unwrap();
    let sup = Run::new(&dir).workers_on_free_port(2).spawn();
    let r = sup.wait_workers(2, 1);
    wait_for("worker 0 ready despite garbage", SECS(20), || {
        let st = sup.status_json();
        (status_workers(&st).iter())
            .any(|w| w["slot"] == 0 && w["state"] == "ready")
            .then_some(())
    });
    // A stranger (this test process) claims readiness on the supervisor's socket.
    let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
    s.send_to(b"READY=1", &r[1]["notify_socket"]).unwrap();
    s.send_to(&vec![b'x'; 10_000], &r[1]["notify_socket"]).ok();
    let st = sup.status_json();
    let starting: Vec<_> = (status_workers(&st).into_iter())
        .filter(|w| {
            w["state"]
                .as_str()
                .is_some_and(|s| s.starts_with("starting"))
        })
        .collect();
    assert!(
        starting.len() == 1 && starting[0]["slot"] == 1,
        "only worker 1 is still starting: {st}"
    );
    let log = sup.log();
    assert!(log.contains("not a worker"), "{log}");
    assert!(
        log.contains("larger than 4096") || log.contains("NUL") || log.contains("UTF-8"),
        "{log}"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_a_documented_code() {
    let dir = TempDir::new("bad");
    let port = free_port();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(clusterctl());
        c.arg("run")
            .args(args)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let l = format!("127.0.0.1:{port}");
    let (code, err) = run(&["--listen", &l, "--", "no-such-worker-binary"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("no-such-worker-binary") && err.contains("No such file"),
        "{err}"
    );
    let f = dir.join("not-exec");
    std::fs::write(&f, "x").unwrap();
    let (code, err) = run(&["--listen", &l, "--", f.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, err) = run(&["--listen", &l, "--workers", "0", "--", "true"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 1"), "{err}");
    let (code, err) = run(&["--", "true"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("--listen"), "{err}");
    let (code, err) = run(&["--listen", "localhost:http", "--", "true"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid listen address"), "{err}");
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (code, err) = run(&["--listen", &l, "--", "true"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Address already in use") && err.contains(&l),
        "{err}"
    );
    drop(holder);
    // Malformed socket activation variables, addressed to the supervisor itself.
    for (fds, names, msg) in [
        ("abc", "", "not a number"),
        ("2", "a", "has 1 names"),
        ("1", "", "not a socket"),
    ] {
        let script = format!(
            "LISTEN_PID=$$ LISTEN_FDS={fds} {} exec {} run -- true 3</dev/null",
            if names.is_empty() {
                String::new()
            } else {
                format!("LISTEN_FDNAMES={names}")
            },
            clusterctl().display()
        );
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{script}: {e}");
        assert!(e.contains(msg), "{script}: {e}");
    }
}

#[test]
fn inherited_sockets_from_systemd_socket_activate() {
    let dir = TempDir::new("activate");
    let port = free_port();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "--fdname=web",
            "-E",
            "PROBE_DIR",
        ])
        .arg(clusterctl())
        .args(["run", "--workers", "2", "--log", "stderr", "--"])
        .arg(probe())
        .env("PROBE_DIR", dir.path())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .expect("systemd-socket-activate (package systemd) is needed");
    let _guard = KillOnDrop(&mut child);
    // systemd-socket-activate starts the service on the first connection.
    let body = wait_for("first answer", SECS(20), || http_get(port, "/").ok());
    assert!(body.contains("name=web"), "{body}");
    let reports: Vec<Report> = wait_for("both workers' reports", SECS(20), || {
        let r = read_reports(dir.path());
        (r.len() == 2).then(|| r.into_values().collect())
    });
    for r in &reports {
        assert_eq!(r["listen_fdnames"], "web");
        assert_eq!(r["listen_pid"], r["pid"]);
        assert_eq!(r["fds"], "0,1,2,3");
    }
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap()),
            Signal::SIGTERM,
        );
        let _ = wait_for("systemd-socket-activate to exit", SECS(40), || {
            self.0.try_wait().unwrap()
        });
    }
}

#[test]
fn reload_starts_a_new_generation_and_rollback_keeps_the_old_one() {
    let dir = TempDir::new("reload");
    let port = free_port();
    let systemd = FakeSystemd::new(&dir);
    let sup = Run::new(&dir)
        .workers_on(port, 2)
        .env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .spawn();
    let gen1 = sup.wait_workers(2, 1);
    systemd.until("READY=1", SECS(20));
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("generation 2 serving"), "{out}");
    let got = systemd.until("READY=1", SECS(20));
    let reloading = got
        .iter()
        .find(|(_, t)| t.contains("RELOADING=1"))
        .expect("RELOADING=1 sent");
    assert!(
        reloading.1.contains("MONOTONIC_USEC="),
        "same datagram: {:?}",
        reloading.1
    );
    sup.wait_workers(2, 2);
    wait_for("old generation gone", SECS(20), || {
        gen1.iter()
            .all(|r| !alive(r["pid"].parse().unwrap()))
            .then_some(())
    });
    let body = http_get(port, "/").unwrap_or_else(|e| panic!("{e}\n{}", sup.log()));
    assert!(body.contains("generation=2"), "{body}");
    // A broken deploy: generation 3 crashes. The reload fails, generation 2 keeps serving.
    std::fs::write(dir.join("mode.gen3"), "crash").unwrap();
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("generation 3") && err.contains("rolled back"),
        "{err}"
    );
    let gen2 = sup.wait_workers(2, 2);
    assert!(gen2.iter().all(|r| alive(r["pid"].parse().unwrap())));
    assert!(http_get(port, "/").unwrap().contains("generation=2"));
    let (_, status, _) = sup.ctl(&["status"]);
    assert!(
        status.contains("FAILED") && status.contains("generation 3"),
        "{status}"
    );
    // SIGHUP reloads too.
    std::fs::remove_file(dir.join("mode.gen3")).unwrap();
    sup.signal(Signal::SIGHUP);
    sup.wait_workers(2, 4);
}

#[test]
fn status_scale_and_signals_for_operators() {
    let dir = TempDir::new("ops");
    let pidfile = dir.join("sup.pid");
    let mut sup = Run::new(&dir)
        .workers_on_free_port(2)
        .args(&["--pidfile", pidfile.to_str().unwrap()])
        .spawn();
    sup.wait_workers(2, 1);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        sup.pid().to_string()
    );
    let (code, out, _) = sup.ctl(&["status", "--json"]);
    assert_eq!(code, 0);
    for key in [
        "\"version\":1",
        "\"supervisor\":{\"pid\":",
        "\"sockets\":[{\"name\":\"listen0\"",
        "\"workers\":[",
        "\"rss_bytes\":",
    ] {
        assert!(out.contains(key), "{key} in {out}");
    }
    let (code, out, _) = sup.ctl(&["scale", "3"]);
    assert_eq!(code, 0, "{out}");
    sup.wait_workers(3, 1);
    sup.signal(Signal::SIGTTIN);
    sup.wait_workers(4, 1);
    // Standard signals do not queue: send the second one after the first took effect.
    sup.signal(Signal::SIGTTOU);
    sup.wait_workers(3, 1);
    sup.signal(Signal::SIGTTOU);
    sup.wait_workers(2, 1);
    sup.signal(Signal::SIGUSR1);
    sup.wait_log("stats: SLOT");
    // The scaled count survives a reload.
    let (code, _, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "{err}");
    sup.wait_workers(2, 2);
    let (code, out, _) = sup.ctl(&["restart", "--rolling", "--wait"]);
    assert_eq!(code, 0, "{out}");
    sup.wait_workers(2, 3);
    sup.signal(Signal::SIGTERM);
    assert_eq!(exit_code(sup.wait_exit()), 0);
    assert!(!pidfile.exists(), "pidfile removed on exit");
    assert!(!sup.control.exists(), "control socket removed on exit");
    let (code, _, err) = sup.ctl(&["status"]);
    assert_eq!(code, 69, "{err}");
}

#[test]
fn pidfile_of_a_running_process_is_refused_and_a_stale_one_replaced() {
    let dir = TempDir::new("pidfile");
    let pidfile = dir.join("p.pid");
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let o = std::process::Command::new(clusterctl())
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&o.stderr).contains("which is running"));
    std::fs::write(&pidfile, "999999999\n").unwrap();
    let sup = Run::new(&dir)
        .workers_on_free_port(1)
        .args(&["--pidfile", pidfile.to_str().unwrap()])
        .spawn();
    sup.wait_workers(1, 1);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        sup.pid().to_string()
    );
}

#[test]
fn status_against_a_dead_or_foreign_socket() {
    let dir = TempDir::new("foreign");
    let (code, _, err) = ctl(&["status"], &dir.join("nothing.sock"));
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("is it running"), "{err}");
    let path = dir.join("foreign.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let (code, _, err) = ctl(&["status"], &path);
    t.join().unwrap();
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("does not speak"), "{err}");
}

#[test]
fn worker_that_stops_pinging_its_watchdog_is_replaced() {
    let dir = TempDir::new("wd");
    std::fs::write(dir.join("mode.1"), "no-watchdog").unwrap();
    let sup = Run::new(&dir)
        .workers_on_free_port(2)
        .args(&["--worker-watchdog", "400ms", "--stop-timeout", "1s"])
        .spawn();
    let first = sup.wait_workers(2, 1);
    assert_eq!(first[0]["watchdog_usec"], "400000");
    assert_eq!(first[0]["watchdog_pid"], first[0]["pid"]);
    sup.wait_log("worker 1 missed its watchdog");
    std::fs::write(dir.join("mode.1"), "ready").unwrap();
    wait_for("slot 1 replaced", SECS(20), || {
        let w = sup.wait_workers(2, 1);
        (w[1]["pid"] != first[1]["pid"]).then_some(())
    });
    let log = sup.log();
    assert!(
        !log.contains("worker 0 missed"),
        "the pinging worker is left alone: {log}"
    );
    assert!(alive(first[0]["pid"].parse().unwrap()));
}

/// The Python worker in tests/workers (protocols only, no libraries).
pub fn pyworker() -> Vec<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/pyworker.py");
    vec!["/usr/bin/python3".into(), script.display().to_string()]
}

#[test]
fn reloads_under_load_fail_no_request() {
    let dir = TempDir::new("zero-downtime");
    let port = free_port();
    let py = pyworker();
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--workers".into(),
        "2".into(),
    ];
    args.extend(["--".into(), py[0].clone(), py[1].clone()]);
    let sup = Run::new(&dir)
        .args(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .spawn_raw();
    wait_for("first answer", SECS(20), || http_get(port, "/").ok());
    let load = crate::support::load::Load::start(port, 2, 2, SECS(120), 1_000_000);
    load.wait_progress(50);
    for generation in 2..=6 {
        let (code, out, err) = sup.ctl(&["reload", "--wait"]);
        assert_eq!(code, 0, "reload {generation}: {out}{err}\n{}", sup.log());
        wait_for("the old generation to finish draining", SECS(20), || {
            let st = sup.status_json();
            (!status_workers(&st).iter().any(|w| w["state"] == "draining")).then_some(())
        });
        load.expect_only_generation(generation);
    }
    let s = load.finish();
    assert_eq!(s.failed, 0, "{s:?}");
    assert!(s.ok > 100, "{s:?}");
}

#[test]
fn gunicorn_as_the_worker_reloads_with_zero_failures() {
    let gunicorn = std::path::Path::new("/usr/bin/gunicorn");
    assert!(
        gunicorn.exists(),
        "gunicorn is needed: apt-get install gunicorn (scripts/test.sh does)"
    );
    let dir = TempDir::new("gunicorn");
    let port = free_port();
    let app_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers");
    let app_dir = app_dir.display().to_string();
    let sup = Run::new(&dir)
        .workers_on(port, 2)
        .args(&[
            "--",
            "/usr/bin/gunicorn",
            "--workers",
            "2",
            "--graceful-timeout",
            "10",
            // Sync workers notice a stop request at the latest after timeout/2; a worker
            // that misses its heartbeat for `timeout` is SIGKILLed by gunicorn itself
            // (mid-request), so not too short on a loaded 2-core CI machine.
            "--timeout",
            "12",
            "--chdir",
            &app_dir,
            "wsgi_app:app",
        ])
        .spawn_raw();
    wait_for("gunicorn answers", SECS(30), || http_get(port, "/").ok());
    let load = crate::support::load::Load::start(port, 3, 0, SECS(120), 1_000_000);
    load.wait_progress(50);
    for generation in 2..=4 {
        let (code, out, err) = sup.ctl(&["reload", "--wait"]);
        assert_eq!(code, 0, "reload {generation}: {out}{err}\n{}", sup.log());
        wait_for("the old generation to finish draining", SECS(30), || {
            let st = sup.status_json();
            (!status_workers(&st).iter().any(|w| w["state"] == "draining")).then_some(())
        });
        load.expect_only_generation(generation);
    }
    let s = load.finish();
    assert_eq!(s.failed, 0, "{s:?}\n{}", sup.log());
}

#[test]
fn every_subcommand_has_help_with_examples_and_man_and_completions_render() {
    let run = |args: &[&str]| {
        let o = std::process::Command::new(clusterctl())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    for sub in [
        "run",
        "gen-units",
        "reload",
        "restart",
        "status",
        "scale",
        "logs",
        "man",
        "completions",
    ] {
        let help = run(&[sub, "--help"]);
        assert!(
            help.contains("Example"),
            "`clusterctl {sub} --help` has examples:\n{help}"
        );
    }
    let man = run(&["man"]);
    assert!(
        man.contains(".TH clusterctl") && man.contains("gen\\-units"),
        "{man}"
    );
    for shell in ["bash", "zsh", "fish"] {
        assert!(run(&["completions", shell]).contains("reload"), "{shell}");
    }
}

#[test]
fn slow_reload_extends_systemds_timeout() {
    let dir = TempDir::new("extend");
    let systemd = FakeSystemd::new(&dir);
    let sup = Run::new(&dir)
        .workers_on_free_port(1)
        .env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .spawn();
    sup.wait_workers(1, 1);
    systemd.until("READY=1", SECS(20));
    // Ready 6 s after start: longer than one extend period (5 s).
    std::fs::write(dir.join("mode.gen2"), "ready-after:6000").unwrap();
    let (code, _, err) = sup.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    let got = systemd.until("READY=1", SECS(60));
    let reloading = got.iter().position(|(_, t)| t.contains("RELOADING=1"));
    let extends: Vec<usize> = (got.iter().enumerate())
        .filter(|(_, (_, t))| t.contains("EXTEND_TIMEOUT_USEC="))
        .map(|(i, _)| i)
        .collect();
    assert!(
        reloading.is_some_and(|r| extends.len() >= 2 && extends[0] > r),
        "RELOADING=1, then an extend at once and another 5 s later: {got:?}"
    );
}

#[test]
fn lazy_supervisor_holds_the_socket_starts_on_demand_and_goes_idle_again() {
    let dir = TempDir::new("lazy");
    let port = free_port();
    let mut sup = Run::new(&dir)
        .workers_on(port, 2)
        .args(&["--lazy", "--exit-idle-after", "1s"])
        .spawn();
    sup.wait_log("holding the sockets");
    let st = sup.status_json();
    assert!(
        st["supervisor"]["phase"] == "idle" && status_workers(&st).is_empty(),
        "{st}"
    );
    assert!(
        read_reports(&dir.0).is_empty(),
        "no worker before the first connection"
    );
    // The first connection waits in the queue and starts generation 1.
    assert!(http_get(port, "/").unwrap().contains("generation=1"));
    sup.wait_workers(2, 1);
    // Idle for 1s: the workers stop, the supervisor keeps the socket.
    sup.wait_log("stopping the workers, holding the sockets");
    wait_for("workers gone", SECS(20), || {
        status_workers(&sup.status_json()).is_empty().then_some(())
    });
    assert!(
        sup.child.try_wait().unwrap().is_none(),
        "the supervisor keeps running"
    );
    assert!(http_get(port, "/").unwrap().contains("generation=2"));
    sup.signal(Signal::SIGTERM);
    assert_eq!(exit_code(sup.wait_exit()), 0);
}

/// Review finding: with `--ready exec` the new workers are ready the moment they are
/// spawned; RELOADING=1 must still reach systemd before READY=1 (or a notify-reload unit's
/// reload never completes), and the final STATUS= must be current.
#[test]
fn reload_with_ready_exec_sends_reloading_before_ready() {
    let dir = TempDir::new("exec-reload");
    let systemd = FakeSystemd::new(&dir);
    let sup = Run::new(&dir)
        .workers_on_free_port(2)
        .args(&["--ready", "exec"])
        .env("NOTIFY_SOCKET", &systemd.path.display().to_string())
        .spawn();
    systemd.until("READY=1", SECS(20));
    sup.signal(Signal::SIGHUP);
    let got = systemd.until("READY=1", SECS(20));
    let reloading = got.iter().position(|(_, t)| t.contains("RELOADING=1"));
    let ready = got.iter().position(|(_, t)| t.contains("READY=1"));
    assert!(reloading.is_some() && reloading <= ready, "{got:?}");
    let last = &got.last().unwrap().1;
    assert!(
        last.contains("STATUS=2/2 workers ready, generation 2"),
        "{got:?}"
    );
}

/// A control client that trickles its request (or says nothing) must not stall the event
/// loop: other clients are answered and workers are refilled meanwhile.
#[test]
fn slow_control_client_does_not_stall_the_supervisor() {
    use std::io::{Read, Write};
    let dir = TempDir::new("slow-client");
    let sup = Run::new(&dir)
        .workers_on_free_port(1)
        .args(&["--restart-delay", "0..1ms"])
        .spawn();
    let first = sup.wait_workers(1, 1);
    let mut slow = std::os::unix::net::UnixStream::connect(&sup.control).unwrap();
    slow.write_all(b"sta").unwrap();
    // While the slow client is connected: a worker crash is refilled and status answers.
    let victim: i32 = first[0]["pid"].parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    wait_for("the worker refilled", SECS(20), || {
        let w = sup.wait_workers(1, 1);
        (w[0]["pid"] != first[0]["pid"]).then_some(())
    });
    let st = sup.status_json();
    assert_eq!(status_workers(&st)[0]["restarts"], 1, "{st}");
    // The slow client is still connected (not yet answered) ...
    slow.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(slow.read(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow client was not answered yet"
    );
    // ... and when its line is complete it gets its answer too.
    slow.set_nonblocking(false).unwrap();
    slow.write_all(b"tus\n").unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("ok"), "{answer}");
}

/// Benchmark finding: with stderr a pipe nobody reads, log writes used to block the
/// supervisor (no reaping, no respawn, no status). Now lines are dropped and counted.
#[test]
fn a_stalled_log_reader_does_not_freeze_the_supervisor() {
    let dir = TempDir::new("stalled-log");
    let control = dir.join("control.sock");
    // 500 workers log ~1000 lines (~80 bytes each) at start: more than a 64 KiB pipe holds.
    let child = std::process::Command::new(clusterctl())
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--workers",
            "500",
        ])
        .args([
            "--ready",
            "exec",
            "--restart-delay",
            "0..1ms",
            "--log",
            "stderr",
            "--control",
        ])
        .arg(&control)
        .args(["--", "sleep", "1000"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // SIGKILL on every exit path (its workers follow through PR_SET_PDEATHSIG).
    let _guard = SigkillOnDrop(child);
    let st = wait_for("500 workers", SECS(60), || {
        let (code, out, _) = ctl(&["status", "--json"], &control);
        let st: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
        let status = st["supervisor"]["status"].as_str()?;
        (code == 0 && status.starts_with("500/500 workers ready")).then_some(st)
    });
    let dropped = st["supervisor"]["log_lines_dropped"].as_u64();
    assert!(dropped.is_some_and(|n| n > 0), "lines were dropped: {st}");
    // A crash is still refilled while nobody reads the log.
    let slot7 = |st: &serde_json::Value| {
        status_workers(st)
            .into_iter()
            .find(|w| w["slot"] == 7 && w["pid"].is_i64())
    };
    let old = slot7(&st).expect("slot 7 has a worker");
    let pid = i32::try_from(old["pid"].as_i64().unwrap()).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    // Refilled means a new worker in slot 7, ready (not the slot backing off, not the
    // old one still listed).
    wait_for("slot 7 refilled", SECS(30), || {
        let w = slot7(&status_json(&control))?;
        (w["pid"] != old["pid"] && w["state"] == "ready").then_some(())
    });
}

struct SigkillOnDrop(std::process::Child);

impl Drop for SigkillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
