//! Crashes, backoff and readiness with the real binary (issues 10, 11 and 12): a crash
//! storm under load, giving up on a crash loop after a good start, `--min-uptime` rolling
//! back a deploy whose workers die right after READY=1 (probe and gunicorn), the early
//! "no READY=1" hint, the warning for workers that ignore the inherited socket, control
//! answers that tell the real outcome, and exits handled before the signals of the same
//! wake-up. The same rules are tested with a fake clock in src/supervisor/handle/tests.rs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::cluster::{
    Run, Supervisor, TempDir, alive, exit_code, free_port, http_get, wait_for, wait_for_or,
};
use crate::support::load::Load;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The supervisor's live children (its workers), from `/proc` (the supervisor has one
/// thread). A child listed here cannot be reused by another process before the
/// supervisor reaps it, so signalling it only ever hits our own worker or a zombie.
fn workers_of(sup: &Supervisor) -> Vec<i32> {
    let pid = sup.pid();
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("/proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)");
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        // The supervisor's other child is its guardian (src/sys.rs names it), not a worker.
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim_end() != "cluster-guard")
        })
        .collect()
}

/// (ready, backing-off) worker rows in `status --json`.
fn pool(sup: &Supervisor) -> (usize, usize) {
    let (_, out, _) = sup.ctl(&["status", "--json"]);
    (
        out.matches("\"state\":\"ready\"").count(),
        out.matches("\"state\":\"backing-off\"").count(),
    )
}

/// Issue 12.5: 4 workers under load, a random one SIGKILLed 10 times a second for 10 s.
/// Workers that were ready are replaced at once, so the pool never sits empty in backoff,
/// recovers right after the storm, and requests fail only on the killed workers.
#[test]
fn crash_storm_under_load_keeps_the_pool_and_recovers_at_once() {
    let dir = TempDir::new("storm");
    let port = free_port();
    // 10 random kills a second over 4 slots leave a worker ~300 ms of life: with the
    // default --min-uptime 1s that is a crash loop by the give-up rule (a full run gave up
    // after 74 kills, none of them 1 s after ready; expected in about 1 run of 15). This
    // test is about the pool surviving a storm, so a life of 100 ms counts as a start.
    let sup = Run::new(&dir)
        .workers_on(port, 4)
        .args(&["--min-uptime", "100ms"])
        .spawn();
    sup.wait_log("all 4 workers ready");
    let load = Load::start(port, 2, 2, SECS(60), 10_000_000);
    load.wait_progress(50);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let (mut kills, mut samples, mut empty) = (0u64, 0u32, 0u32);
    let storm = Instant::now();
    let ok_before = load.ok();
    let mut next = storm;
    while storm.elapsed() < SECS(10) {
        next += Duration::from_millis(100);
        let pids = workers_of(&sup);
        if !pids.is_empty() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let victim = pids[usize::try_from(seed % pids.len() as u64).unwrap()];
            if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        if kills.is_multiple_of(5) {
            samples += 1;
            empty += u32::from(pool(&sup).0 == 0);
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let during = load.ok() - ok_before;
    let after_storm = Instant::now();
    wait_for_or(
        SECS(5),
        || (pool(&sup) == (4, 0)).then_some(()),
        || format!("4 ready workers after the storm\n{}", sup.log()),
    );
    let recovered = after_storm.elapsed();
    load.wait_progress(50);
    let s = load.finish();
    eprintln!(
        "storm: {kills} kills in 10s, {during} requests answered during it, pool without a \
         ready worker in {empty} of {samples} samples, 4/4 ready {recovered:?} after it, \
         {} failed, {} retried",
        s.failed, s.retried
    );
    assert!(
        empty * 10 <= samples,
        "no ready worker in {empty} of {samples} samples\n{}",
        sup.log()
    );
    assert!(kills >= 50, "only {kills} kills");
    assert!(
        recovered < SECS(3),
        "recovery took {recovered:?}\n{}",
        sup.log()
    );
    assert!(during >= 100, "{during} requests answered during the storm");
    // Each kill can only break the requests in flight on that worker: at most one per
    // client thread.
    assert!(s.failed <= kills * 4, "{s:?}");
    let log = sup.log();
    assert!(!log.contains("giving up"), "{log}");
    assert!(!log.contains("no worker accepted"), "{log}");
}

/// Issue 10: all workers dying right after READY=1, again and again, after the first
/// generation served: exit 1 with the reason instead of staying "active" with 0 workers.
#[test]
fn crash_loop_after_a_good_start_exits_1_with_the_reason() {
    let dir = TempDir::new("give-up");
    let mut sup = Run::new(&dir).workers_on_free_port(2).spawn();
    sup.wait_log("all 2 workers ready");
    let served = Instant::now();
    std::fs::write(dir.join("mode"), "crash-after-ready:100").unwrap();
    for p in workers_of(&sup) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let status = sup.wait_exit();
    let took = served.elapsed();
    let log = sup.log();
    assert_eq!(exit_code(status), 1, "{log}");
    assert!(
        log.contains("every worker failed to start 3 times in a row")
            && log.contains("--min-uptime 1s"),
        "{log}"
    );
    assert!(
        took >= SECS(9) && took < SECS(30),
        "gave up after {took:?}\n{log}"
    );
}

/// Issue 11: a new generation whose workers die soon after READY=1 is rolled back (the
/// old one keeps serving, `reload --wait` exits 1); a good one is accepted after
/// `--min-uptime`.
#[test]
fn reload_whose_workers_die_right_after_ready_is_rolled_back() {
    let dir = TempDir::new("min-uptime");
    let port = free_port();
    let sup = Run::new(&dir)
        .workers_on(port, 2)
        .args(&["--min-uptime", "2s"])
        .spawn();
    let old = sup.wait_workers(2, 1);
    sup.wait_log("all 2 workers ready");
    std::fs::write(dir.join("mode.gen2"), "crash-after-ready:500").unwrap();
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 1, "{out}{err}\n{}", sup.log());
    assert!(err.contains("within --min-uptime 2s"), "{err}");
    for w in &old {
        assert!(alive(w["pid"].parse().unwrap()), "old worker kept: {w:?}");
    }
    // The rolled-back generation's last worker may still be draining (and crashing
    // 500 ms after its READY=1, as told): ask once it is gone.
    wait_for("the rolled-back generation to be gone", SECS(30), || {
        let (_, out, _) = sup.ctl(&["status", "--json"]);
        (!out.contains("\"generation\":2,\"state\"")).then_some(())
    });
    assert!(http_get(port, "/").unwrap().contains("generation=1"));
    let started = Instant::now();
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "{out}{err}\n{}", sup.log());
    assert!(started.elapsed() >= SECS(2), "accepted before min-uptime");
    assert!(out.contains("generation 3 serving"), "{out}");
}

/// Issue 11 with the real thing: gunicorn's master sends READY=1 before its worker
/// imports the app (no --preload), so a deploy that fails to import must still roll back.
#[test]
fn gunicorn_deploy_that_fails_to_import_is_rolled_back() {
    let gunicorn = std::path::Path::new("/usr/bin/gunicorn");
    if !gunicorn.exists() {
        crate::support::skip("/usr/bin/gunicorn is not installed (apt-get install gunicorn)");
        return;
    }
    let dir = TempDir::new("gunicorn-broken");
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    let good = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/wsgi_app.py"),
    )
    .unwrap();
    std::fs::write(app.join("deploy.py"), &good).unwrap();
    let port = free_port();
    let app_dir = app.display().to_string();
    let sup = Run::new(&dir)
        .workers_on(port, 2)
        // Without --preload the master is "ready" before its worker imports the app; the
        // import takes 0.2 s here when idle but several seconds under a full test run, so
        // the rule is exercised with a min-uptime above that (README "Servers", gunicorn).
        .args(&[
            "--min-uptime",
            "10s",
            "--",
            "/usr/bin/gunicorn",
            "--workers",
            "1",
            "--chdir",
            &app_dir,
            "deploy:app",
        ])
        .spawn_raw();
    sup.wait_log("all 2 workers ready");
    let before = http_get(port, "/").unwrap();
    assert!(before.contains("generation=1"), "{before}");
    std::fs::write(
        app.join("deploy.py"),
        format!("import nonexistent_module_for_the_test\n{good}"),
    )
    .unwrap();
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    let log = sup.log();
    assert_eq!(code, 1, "the broken deploy must fail: {out}{err}\n{log}");
    assert!(err.contains("after it was ready"), "{err}");
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("after it was ready, within"))
    {
        eprintln!("gunicorn: {line}");
    }
    for _ in 0..10 {
        let body = http_get(port, "/").unwrap();
        assert!(
            body.contains("generation=1"),
            "old generation serves: {body}"
        );
    }
}

/// Issues 10/11: a worker that never sends READY=1 is reported after 5 s (log and
/// status), and the ready timeout names the fix.
#[test]
fn missing_ready_is_reported_early_with_the_fix() {
    let dir = TempDir::new("no-ready");
    let sup = Run::new(&dir)
        .workers_on_free_port(1)
        .args(&["--ready-timeout", "8s"])
        .env("PROBE_MODE", "never-ready")
        .spawn();
    let started = Instant::now();
    sup.wait_log("has not sent READY=1");
    let early = started.elapsed();
    assert!(early < SECS(8), "said only after {early:?}");
    let (_, json, _) = sup.ctl(&["status", "--json"]);
    assert!(json.contains("starting (no READY=1 yet)"), "{json}");
    let log = sup.log();
    assert!(
        log.contains("--ready after:DUR") && log.contains("--ready exec"),
        "{log}"
    );
    sup.wait_log("was not ready within 8s: killing it (no READY=1 arrived");
}

/// Issue 11: `--ready exec -- python3 -m http.server` binds a port of its own and never
/// looks at fd 3: connections queue on clusterctl's socket with nobody accepting. Warn,
/// naming LISTEN_FDS / fd 3.
#[test]
fn worker_that_ignores_the_inherited_socket_is_reported() {
    let dir = TempDir::new("ignores-fd3");
    let port = free_port();
    let other = free_port();
    let other_s = other.to_string();
    let sup = Run::new(&dir)
        .workers_on(port, 1)
        .args(&[
            "--ready",
            "exec",
            "--",
            "/usr/bin/python3",
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &other_s,
        ])
        .spawn_raw();
    sup.wait_log("all 1 workers ready");
    // Connects (the kernel completes the handshake), but nobody will ever accept it.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_for_or(
        SECS(20),
        || sup.log().contains("no worker accepted them").then_some(()),
        || format!("the warning\n{}", sup.log()),
    );
    let log = sup.log();
    assert!(log.contains("fd 3") && log.contains("LISTEN_FDS"), "{log}");
    assert_eq!(log.matches("no worker accepted them").count(), 1, "{log}");
}

/// Sends raw control requests (one line each) in this order; returns their streams.
fn requests(control: &std::path::Path, lines: &[&str]) -> Vec<UnixStream> {
    lines
        .iter()
        .map(|l| {
            let mut s = UnixStream::connect(control).unwrap();
            s.set_read_timeout(Some(SECS(30))).unwrap();
            s.write_all(format!("{l}\n").as_bytes()).unwrap();
            s
        })
        .collect()
}

fn answer(s: UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Issue 12.7: a reload and a scale arriving in the same wake-up: the scale is refused by
/// the state machine, and the client is told so (not "ok" followed by nothing).
#[test]
fn scale_in_the_same_wake_as_a_reload_is_answered_with_the_refusal() {
    let dir = TempDir::new("scale-answer");
    let sup = Run::new(&dir).workers_on_free_port(2).spawn();
    sup.wait_log("all 2 workers ready");
    sup.signal(Signal::SIGSTOP);
    let streams = requests(&sup.control, &["reload", "scale 3"]);
    sup.signal(Signal::SIGCONT);
    let mut it = streams.into_iter();
    let reload = answer(it.next().unwrap());
    let scale = answer(it.next().unwrap());
    assert!(reload.starts_with("ok reload requested"), "{reload}");
    assert!(
        scale.starts_with("error") && scale.contains("reload is in progress"),
        "{scale}"
    );
    sup.wait_log("generation 2 serving");
    let st = sup.status_json();
    assert_eq!(st["supervisor"]["workers_wanted"], 2, "{st}");
    let (code, out, _) = sup.ctl(&["scale", "3"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("scaling from 2 to 3 workers"), "{out}");
}

/// Issue 12.8: signalfd yields SIGTERM before SIGCHLD. A worker that died in the same
/// wake-up as a SIGTERM is handled as dead before the stop: it is not signalled (its pid
/// is reaped and could be reused), and its exit is a crash, not "supervisor stopping".
#[test]
fn exits_are_handled_before_a_stop_of_the_same_wake_up() {
    let dir = TempDir::new("exit-order");
    let mut sup = Run::new(&dir).workers_on_free_port(2).spawn();
    sup.wait_log("all 2 workers ready");
    let victim = workers_of(&sup)[0];
    sup.signal(Signal::SIGSTOP);
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    // Dead for the supervisor too: a zombie leader whose other threads are still exiting
    // is neither reapable nor pidfd-readable yet (a full run saw its exit only after the
    // stop), so also wait until it is the last task of its thread group.
    wait_for("the worker to die", SECS(10), || {
        let tasks = std::fs::read_dir(format!("/proc/{victim}/task")).map_or(0, Iterator::count);
        (!alive(victim) && tasks <= 1).then_some(())
    });
    sup.signal(Signal::SIGTERM);
    sup.signal(Signal::SIGCONT);
    let status = sup.wait_exit();
    let log = sup.log();
    assert_eq!(exit_code(status), 0, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("(signal SIGKILL)"))
        .unwrap_or_default();
    assert!(
        line.contains("exited unexpectedly (signal SIGKILL)") && !line.contains("stopping"),
        "the dead worker's exit comes before the stop: {line:?}\n{log}"
    );
}
