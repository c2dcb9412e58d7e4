//! End to end inside a real systemd 252 booted in private namespaces (see
//! `support::systemd`): units written by `clusterctl gen-units`, socket activation,
//! status and journal, stop/restart, Restart=on-failure, zero-downtime reloads under load,
//! rollback of a broken deploy, the watchdog, and scale to zero.

use std::time::{Duration, Instant};

use crate::support::cluster::{clusterctl, example, http_get, wait_for};
use crate::support::free_port;
use crate::support::load::Load;
use crate::support::systemd::Systemd;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn pyworker() -> Vec<String> {
    vec![
        "/usr/bin/python3".into(),
        Systemd::path(&repo("tests/workers/pyworker.py")),
    ]
}

/// `clusterctl gen-units APP -o /etc/systemd/system --listen 127.0.0.1:PORT EXTRA -- CMD`
/// inside the booted systemd, then daemon-reload and start APP.socket.
fn install(sd: &Systemd, app: &str, port: u16, extra: &[&str], cmd: &[String]) {
    let bin = Systemd::path(&clusterctl());
    let listen = format!("127.0.0.1:{port}");
    let mut argv: Vec<&str> = vec![
        &bin,
        "gen-units",
        app,
        "-o",
        "/etc/systemd/system",
        "--listen",
        &listen,
    ];
    argv.extend(extra);
    argv.push("--");
    argv.extend(cmd.iter().map(String::as_str));
    let out = sd.run(&argv);
    assert!(
        out.status.success(),
        "gen-units failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    sd.systemctl_ok(&["daemon-reload"]);
    sd.systemctl_ok(&["start", &format!("{app}.socket")]);
}

/// Runs a command inside and returns its stdout (panics on failure).
fn inside(sd: &Systemd, argv: &[&str]) -> String {
    let out = sd.run(argv);
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(sd: &Systemd, app: &str) -> String {
    let bin = Systemd::path(&clusterctl());
    inside(sd, &[&bin, "status", "--json", app])
}

fn wait_no_draining(sd: &Systemd, app: &str) {
    wait_for("the old generation to finish draining", SECS(30), || {
        (!status_json(sd, app).contains("\"draining\"")).then_some(())
    });
}

fn distinct_pids(port: u16, want: usize) -> usize {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        if let Ok(body) = http_get(port, "/")
            && let Some(pid) = body.split_whitespace().find(|w| w.starts_with("pid="))
        {
            seen.insert(pid.to_string());
        }
        if seen.len() >= want {
            break;
        }
    }
    seen.len()
}

#[test]
fn socket_activation_status_journal_and_exact_arguments() {
    let Some(sd) = Systemd::boot() else { return };
    let port = free_port();
    let args = [
        "a b",
        "\"quoted\"",
        "back\\slash",
        "100%",
        "%n",
        "$HOME",
        "${X}",
        "é ✓",
        "",
        "'single'",
    ];
    let mut cmd = pyworker();
    cmd.extend(args.iter().map(|a| (*a).to_string()));
    install(&sd, "pyapp", port, &["--workers", "3"], &cmd);
    // The first connection activates the service.
    let body = wait_for("the first answer", SECS(30), || http_get(port, "/").ok());
    assert!(body.contains("lang=python"), "{body}");
    // READY=1 goes upstream once every worker stayed up --min-uptime after its own.
    sd.wait_for("pyapp to be active", SECS(30), || {
        sd.unit_property("pyapp.service", "ActiveState") == "active"
    });
    assert_eq!(distinct_pids(port, 3), 3, "three workers answer");
    // Every argument arrives byte for byte.
    let expected = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import json,sys; print(json.dumps(sys.argv[1:]))"])
        .args(args)
        .output()
        .unwrap();
    let expected = String::from_utf8(expected.stdout).unwrap();
    assert_eq!(http_get(port, "/argv").unwrap(), expected.trim_end());
    // systemctl status shows the supervisor's STATUS= line.
    let status = String::from_utf8_lossy(&sd.systemctl(&["status", "pyapp"]).stdout).into_owned();
    assert!(
        status.contains("3/3 workers ready, generation 1"),
        "{status}"
    );
    // The supervisor's events about worker 1, and worker 1's own output.
    let events = sd.journal(&["-u", "pyapp", "WORKER_ID=1", "-o", "cat"]);
    assert!(events.contains("worker 1 ready"), "{events}");
    assert!(!events.contains("worker 2 ready"), "{events}");
    let own = sd.journal(&["-u", "pyapp", "-t", "pyapp/1", "-o", "cat"]);
    assert!(own.contains("pyworker 1 pid"), "{own}");
    assert!(!own.contains("pyworker 2 pid"), "{own}");
    let bin = Systemd::path(&clusterctl());
    let logs = inside(&sd, &[&bin, "logs", "pyapp", "--worker", "1"]);
    assert!(
        logs.contains("worker 1 ready") && logs.contains("pyworker 1 pid"),
        "{logs}"
    );
    assert!(!logs.contains("pyworker 2 pid"), "{logs}");
    let table = inside(&sd, &[&bin, "status", "pyapp"]);
    assert!(
        table.contains("python worker serving"),
        "worker STATUS= text: {table}"
    );
}

#[test]
fn stop_restart_and_restart_on_failure() {
    let Some(sd) = Systemd::boot() else { return };
    let port = free_port();
    let worker = vec![Systemd::path(&example("worker"))];
    install(
        &sd,
        "rapp",
        port,
        &["--workers", "2", "--stop-timeout", "5s"],
        &worker,
    );
    wait_for("the first answer", SECS(30), || http_get(port, "/").ok());
    // A restart while a client loop runs refuses no connection: the socket stays with
    // systemd and connections wait in its queue.
    let load = Load::start(port, 3, 0, SECS(60), 1_000_000);
    load.wait_progress(50);
    sd.systemctl_ok(&["restart", "rapp.service"]);
    load.wait_progress(50);
    let s = load.finish();
    assert_eq!(s.failed, 0, "{s:?}");
    // Stop: no worker left, the socket still listening.
    sd.systemctl_ok(&["stop", "rapp.service"]);
    let left =
        String::from_utf8_lossy(&sd.run(&["pgrep", "-f", "examples/worker"]).stdout).into_owned();
    assert_eq!(left.trim(), "", "no worker left after stop");
    assert_eq!(sd.unit_property("rapp.socket", "ActiveState"), "active");
    assert_eq!(sd.unit_property("rapp.service", "Result"), "success");
    // The next connection starts it again.
    wait_for("an answer after stop", SECS(30), || {
        http_get(port, "/").ok()
    });
    // Restart=on-failure: SIGKILL of the supervisor brings the service back.
    let main = sd.unit_property("rapp.service", "MainPID");
    inside(&sd, &["kill", "-KILL", &main]);
    sd.wait_for("a new main pid", SECS(30), || {
        let now = sd.unit_property("rapp.service", "MainPID");
        now != main && now != "0" && sd.unit_property("rapp.service", "ActiveState") == "active"
    });
    assert_eq!(sd.unit_property("rapp.service", "NRestarts"), "1");
    assert!(http_get(port, "/").is_ok());
}

#[test]
fn configuration_error_does_not_restart_loop() {
    let Some(sd) = Systemd::boot() else { return };
    let port = free_port();
    sd.write_file("/usr/local/bin/soon-gone", b"#!/bin/sh\nexec sleep 1000\n");
    inside(&sd, &["chmod", "+x", "/usr/local/bin/soon-gone"]);
    install(
        &sd,
        "bad",
        port,
        &["--workers", "1"],
        &["/usr/local/bin/soon-gone".to_string()],
    );
    inside(&sd, &["rm", "/usr/local/bin/soon-gone"]);
    let _ = sd.systemctl(&["start", "bad.service"]);
    sd.wait_for("the unit to fail", SECS(30), || {
        sd.unit_property("bad.service", "ActiveState") == "failed"
    });
    assert_eq!(sd.unit_property("bad.service", "ExecMainStatus"), "78");
    // RestartPreventExitStatus= keeps it from looping: "failed", not "activating
    // (auto-restart)", is final.
    assert_eq!(sd.unit_property("bad.service", "NRestarts"), "0");
    let log = sd.journal(&["-u", "bad", "-o", "cat"]);
    assert!(
        log.contains("soon-gone") && log.contains("No such file"),
        "{log}"
    );
}

#[test]
fn reloads_under_load_rollback_and_rolling_restart_fail_no_request() {
    let Some(sd) = Systemd::boot() else { return };
    let port = free_port();
    // The deploy is a script the test rewrites, as a real deploy replaces the app.
    let worker = Systemd::path(&example("worker"));
    sd.write_file(
        "/usr/local/bin/app",
        format!("#!/bin/sh\nexec {worker}\n").as_bytes(),
    );
    inside(&sd, &["chmod", "+x", "/usr/local/bin/app"]);
    install(
        &sd,
        "zapp",
        port,
        &["--workers", "2", "--ready-timeout", "10s"],
        &["/usr/local/bin/app".to_string()],
    );
    wait_for("the first answer", SECS(30), || http_get(port, "/").ok());
    // A reload while the unit is still activating merges into its start job: wait until
    // READY=1 (sent once every worker stayed up --min-uptime).
    sd.wait_for("zapp to be active", SECS(30), || {
        sd.unit_property("zapp.service", "ActiveState") == "active"
    });
    let load = Load::start(port, 2, 2, SECS(300), 10_000_000);
    load.wait_progress(100);
    for generation in 2..=11 {
        let out = sd.systemctl(&["reload", "zapp"]);
        assert!(
            out.status.success(),
            "reload {generation}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_no_draining(&sd, "zapp");
        load.expect_only_generation(generation);
    }
    // A broken deploy: the reload fails, the old generation answers throughout.
    sd.write_file(
        "/usr/local/bin/app",
        b"#!/bin/sh\necho broken deploy >&2\nexit 3\n",
    );
    let out = sd.systemctl(&["reload", "zapp"]);
    assert!(
        !out.status.success(),
        "a failed reload must fail systemctl reload"
    );
    load.reset_generations();
    load.wait_progress(50);
    assert_eq!(load.generations(), ["11"]);
    let status = String::from_utf8_lossy(&sd.systemctl(&["status", "zapp"]).stdout).into_owned();
    assert!(
        status.contains("failed") && status.contains("generation 12"),
        "{status}"
    );
    // Fixed deploy, rolling restart.
    sd.write_file(
        "/usr/local/bin/app",
        format!("#!/bin/sh\nexec {worker}\n").as_bytes(),
    );
    let bin = Systemd::path(&clusterctl());
    inside(&sd, &[&bin, "restart", "--rolling", "--wait", "zapp"]);
    wait_no_draining(&sd, "zapp");
    load.expect_only_generation(13);
    let s = load.finish();
    assert_eq!(s.failed, 0, "{s:?}");
    assert!(s.ok > 1000, "{s:?}");
    eprintln!(
        "zero-downtime: {} requests, {} failed, {} keep-alive retries",
        s.ok, s.failed, s.retried
    );
}

#[test]
fn watchdog_restarts_a_hung_supervisor_and_queued_connections_are_served() {
    let Some(sd) = Systemd::boot() else { return };
    let port = free_port();
    let worker = vec![Systemd::path(&example("worker"))];
    install(
        &sd,
        "wapp",
        port,
        &["--workers", "2", "--watchdog", "2s", "--stop-timeout", "2s"],
        &worker,
    );
    wait_for("the first answer", SECS(30), || http_get(port, "/").ok());
    let main = sd.unit_property("wapp.service", "MainPID");
    inside(&sd, &["kill", "-STOP", &main]);
    sd.wait_for("the watchdog to fire", SECS(30), || {
        sd.unit_property("wapp.service", "ActiveState") != "active"
    });
    // A connection made while the service is being killed waits in the socket's queue.
    let queued = std::thread::spawn(move || http_get(port, "/"));
    sd.wait_for("a restart", SECS(60), || {
        let now = sd.unit_property("wapp.service", "MainPID");
        now != main && now != "0" && sd.unit_property("wapp.service", "ActiveState") == "active"
    });
    assert!(
        queued.join().unwrap().is_ok(),
        "the queued request was served"
    );
    assert_eq!(sd.unit_property("wapp.service", "NRestarts"), "1");
    let log = sd.journal(&["-u", "wapp", "-o", "cat"]);
    assert!(
        log.contains("Watchdog timeout") || log.contains("watchdog"),
        "{log}"
    );
}

#[test]
fn idle_service_exits_cleanly_and_the_next_request_starts_it() {
    let Some(sd) = Systemd::boot() else { return };
    let port = free_port();
    let worker = vec![Systemd::path(&example("worker"))];
    install(
        &sd,
        "iapp",
        port,
        &["--workers", "2", "--exit-idle-after", "2s"],
        &worker,
    );
    wait_for("the first answer", SECS(30), || http_get(port, "/").ok());
    let main = sd.unit_property("iapp.service", "MainPID");
    // Busy traffic keeps it alive past the idle timeout.
    let until = Instant::now() + SECS(4);
    while Instant::now() < until {
        http_get(port, "/").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        sd.unit_property("iapp.service", "MainPID"),
        main,
        "still the same process"
    );
    // Idle: the service ends cleanly, the socket stays.
    sd.wait_for("the idle exit", SECS(30), || {
        sd.unit_property("iapp.service", "ActiveState") == "inactive"
    });
    assert_eq!(sd.unit_property("iapp.service", "Result"), "success");
    assert_eq!(sd.unit_property("iapp.socket", "ActiveState"), "active");
    // Cold start: the next request is served by a new process.
    let t = Instant::now();
    let body = http_get(port, "/").unwrap();
    let cold = t.elapsed();
    eprintln!("cold start (first request after idle exit): {cold:?}");
    assert!(body.contains("generation=1"), "{body}");
    assert_ne!(sd.unit_property("iapp.service", "MainPID"), main);
    // A request racing the idle exit is served (by the old workers or the next start).
    sd.wait_for("the next idle exit to begin", SECS(30), || {
        sd.unit_property("iapp.service", "ActiveState") == "deactivating"
            || sd.unit_property("iapp.service", "ActiveState") == "inactive"
    });
    assert!(
        http_get(port, "/").is_ok(),
        "a request racing the idle exit is served"
    );
}
