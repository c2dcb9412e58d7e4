//! Worker recycling with the real binary (issue 15): `--max-worker-age` under load replaces
//! the workers one slot at a time, new before old, with no failed request;
//! `--max-worker-memory` replaces the worker that holds too much memory; `gen-units`
//! passes both options on to `ExecStart=`. The rules themselves are tested with a fake
//! clock in src/supervisor/handle/tests.rs (mod recycle).

use std::time::{Duration, Instant};

use crate::run::pyworker;
use crate::support::cluster::{
    Run, Supervisor, TempDir, alive, clusterctl, free_port, wait_for_or,
};
use crate::support::load::Load;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The supervisor's live workers, from `/proc`.
fn children(sup: &Supervisor) -> Vec<i32> {
    let pid = sup.pid();
    let own_exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("/proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        // Not the supervisor's guardian (a fork of it, never exec'd; see src/sys.rs).
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok() != own_exe)
        .collect()
}

fn pyworker_run(dir: &TempDir, port: u16, workers: u32, extra: &[&str]) -> Run {
    let py = pyworker();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--workers".into(),
        workers.to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    args.extend(["--".into(), py[0].clone(), py[1].clone()]);
    Run::new(dir).args(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn age_recycles_one_slot_at_a_time_under_load_without_failures() {
    let dir = TempDir::new("recycle-age");
    let port = free_port();
    let n = 3;
    let sup = pyworker_run(
        &dir,
        port,
        n,
        &["--max-worker-age", "3s±20%", "--min-uptime", "300ms"],
    )
    .spawn_raw();
    sup.wait_log("all 3 workers ready");
    let first: Vec<i32> = children(&sup);
    assert_eq!(first.len(), n as usize);
    let load = Load::start(port, 2, 2, SECS(90), 10_000_000);
    load.wait_progress(50);
    // Until every first worker was replaced and 6 recycles finished: never more than one
    // extra worker, never fewer than N ready.
    let (mut max_children, mut min_ready, mut looks) = (0, usize::MAX, 0);
    let (mut calls, mut slowest, mut phases) = (0, Duration::ZERO, Vec::new());
    wait_for_or(
        SECS(60),
        || {
            max_children = max_children.max(children(&sup).len());
            let asked = std::time::Instant::now();
            let (_, json, _) = sup.ctl(&["status", "--json"]);
            calls += 1;
            slowest = slowest.max(asked.elapsed());
            if json.contains("\"phase\":\"running\"") {
                looks += 1;
                min_ready = min_ready.min(json.matches("\"state\":\"ready\"").count());
            } else if phases.len() < 5 {
                phases.push(json.chars().take(300).collect::<String>());
            }
            let done = sup.log().matches(" recycled: pid ").count();
            let gone = first.iter().all(|p| !alive(*p));
            std::thread::sleep(Duration::from_millis(20));
            (done >= 6 && gone).then_some(())
        },
        || format!("6 recycles in\n{}", sup.log()),
    );
    let summary = load.finish();
    let log = sup.log();
    assert_eq!(summary.failed, 0, "{summary:?}\n{log}");
    assert!(summary.ok > 100, "{summary:?}");
    assert!(
        max_children <= n as usize + 1,
        "{max_children} workers at once\n{log}"
    );
    // Each look runs a `clusterctl status` process: few under a loaded full suite.
    assert!(
        looks >= 5,
        "status answered only {looks} times while running ({calls} calls, slowest \
         {slowest:?}; other answers: {phases:?})"
    );
    assert!(
        min_ready >= n as usize,
        "only {min_ready} ready at some point\n{log}"
    );
    // Strictly one at a time: start, finish, start, finish ... each for the same slot,
    // and the old worker exited before the next one started.
    let lines: Vec<&str> = log.lines().collect();
    let mut recycles = 0;
    let mut at = 0;
    while let Some(start) =
        (at..lines.len()).find(|&i| lines[i].contains("starting its replacement"))
    {
        let slot = lines[start]
            .split("recycling worker ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap();
        assert!(
            lines[start].contains("past its --max-worker-age limit"),
            "{}",
            lines[start]
        );
        let Some(done) = (start + 1..lines.len()).find(|&i| lines[i].contains(" recycled: pid "))
        else {
            break; // the last one, still running when we stopped looking
        };
        assert!(
            lines[done].starts_with(&format!("worker {slot} recycled"))
                || lines[done].contains(&format!(" worker {slot} recycled")),
            "{}\n{}",
            lines[start],
            lines[done]
        );
        let old = lines[done]
            .split(", pid ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap();
        let next = (done + 1..lines.len())
            .find(|&i| lines[i].contains("starting its replacement"))
            .unwrap_or(lines.len());
        assert!(
            lines[start + 1..done]
                .iter()
                .all(|l| !l.contains("starting its replacement")),
            "one at a time\n{log}"
        );
        // The stderr log names the worker at the end: "[generation G, pid P]".
        let exit = format!("pid {old}]");
        if next < lines.len() {
            assert!(
                lines[done..next]
                    .iter()
                    .any(|l| l.contains("exited") && l.contains(&exit)),
                "pid {old} exits before the next recycle starts\n{log}"
            );
        }
        recycles += 1;
        at = done + 1;
    }
    assert!(recycles >= 6, "{recycles} recycles\n{log}");
    let (code, json, err) = sup.ctl(&["status", "--json"]);
    assert!(
        json.contains("\"reason\":\"age\""),
        "{code} {json} {err} {}",
        sup.log()
    );
    let (code, table, err) = sup.ctl(&["status"]);
    assert!(
        table.contains("RECYCLES") && table.contains(" age "),
        "{code} {table} {err}"
    );
}

#[test]
fn memory_recycles_the_worker_that_holds_too_much() {
    let dir = TempDir::new("recycle-memory");
    let port = free_port();
    let once = dir.join("alloc.once");
    let sup = pyworker_run(&dir, port, 2, &["--max-worker-memory", "60M"])
        .env("PYWORKER_ALLOC_MB", "96")
        .env("PYWORKER_ALLOC_ONCE", &once.display().to_string())
        .spawn_raw();
    sup.wait_log("all 2 workers ready");
    let load = Load::start(port, 1, 1, SECS(60), 10_000_000);
    load.wait_progress(20);
    let started = Instant::now();
    wait_for_or(
        SECS(40),
        || sup.log().contains(" recycled: pid ").then_some(()),
        || format!("a memory recycle in\n{}", sup.log()),
    );
    let took = started.elapsed();
    let log = sup.log();
    let line = log
        .lines()
        .find(|l| l.contains("recycling worker "))
        .unwrap();
    assert!(
        line.contains("above --max-worker-memory 60M in 2 samples 5s apart"),
        "{line}"
    );
    let old: i32 = line
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    wait_for_or(
        SECS(20),
        || (!alive(old)).then_some(()),
        || format!("pid {old} drained\n{}", sup.log()),
    );
    load.wait_progress(20);
    let summary = load.finish();
    assert_eq!(summary.failed, 0, "{summary:?}\n{}", sup.log());
    let log = sup.log();
    assert_eq!(
        log.matches("recycling worker ").count(),
        1,
        "only the worker that allocated, once: {log}"
    );
    let (_, json, _) = sup.ctl(&["status", "--json"]);
    assert!(json.contains("\"recycles\":1,\"last_recycle\":{"), "{json}");
    assert!(json.contains("\"reason\":\"memory\""), "{json}");
    // Two samples 5 s apart, and the replacement's start: well under 20 s.
    assert!(took < SECS(20), "{took:?}");
}

#[test]
fn gen_units_passes_the_recycle_options_on() {
    let out = std::process::Command::new(clusterctl())
        .args([
            "gen-units",
            "demo",
            "--listen",
            "8080",
            "--systemd-version",
            "257",
            "--max-worker-memory",
            "512M",
            "--max-worker-age",
            "6h±10%",
            "--",
            "/usr/bin/server",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exec = stdout
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap_or_else(|| panic!("{stdout}"));
    // `%` is a specifier in unit files: escaped as `%%`.
    assert!(
        exec.contains(" --max-worker-memory 512M --max-worker-age \"6h±10%%\" "),
        "{exec}"
    );
}
