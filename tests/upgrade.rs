//! `clusterctl upgrade` outside systemd (issue 15, part 2): the supervisor re-executes a
//! clusterctl binary in the same pid and keeps its workers. What differs between the two
//! "builds" here: the binary's path (a copy of the test binary), which `status` and the
//! upgrade's answer report; the code is the same. The hand-over format's own rules
//! (round trip, unknown version, corrupt and truncated snapshots) are unit tests in
//! src/supervisor/handover.rs. A damaged snapshot is made here by a wrapper script given
//! as `--binary`: it rewrites the inherited memfd, then execs the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::run::pyworker;
use crate::support::cluster::{
    FakeSystemd, Run, Supervisor, TempDir, alive, clusterctl, free_port, http_get, wait_for_or,
};
use crate::support::load::Load;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The supervisor's live workers, from `/proc` (not its guardian, `cluster-guard`).
fn workers(sup: &Supervisor) -> Vec<i32> {
    let pid = sup.pid();
    let mut v: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("/proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() != "cluster-guard")
        })
        .collect();
    v.sort_unstable();
    v
}

fn start(dir: &TempDir, port: u16, n: u32, env: &[(&str, &str)]) -> Supervisor {
    let py = pyworker();
    let mut run = Run::new(dir).args(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--workers",
        &n.to_string(),
        "--",
        &py[0],
        &py[1],
    ]);
    for (k, v) in env {
        run = run.env(k, v);
    }
    let sup = run.spawn_raw();
    sup.wait_log(&format!("all {n} workers ready"));
    wait_for_or(
        SECS(20),
        || (workers(&sup).len() == n as usize).then_some(()),
        || format!("{n} workers\n{}", sup.log()),
    );
    sup
}

/// A copy of the clusterctl binary at another path: the "new build". Copied by `cp`, not
/// in this process: a file this (multi-threaded) test process has open for writing can be
/// inherited by a child another test forks at that moment, and executing it then fails
/// with ETXTBSY (seen once in a full run).
fn copy_binary(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    let status = std::process::Command::new("cp")
        .arg(clusterctl())
        .arg(&p)
        .status()
        .unwrap();
    assert!(status.success(), "cp clusterctl {}", p.display());
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A wrapper given as `--binary`: the supervisor's check (`BINARY upgrade --help`) goes
/// straight to the real binary; the exec with `--resume-from` runs `body`.
fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    let pass = format!(
        "case \" $* \" in *\" --resume-from=\"*) ;; *) exec {} \"$@\";; esac",
        clusterctl().display()
    );
    std::fs::write(&p, format!("#!/bin/sh\nset -e\n{pass}\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Shell that finds the snapshot's fd in the new image's arguments.
const FIND_FD: &str = r#"fd=""; for a in "$@"; do case "$a" in --resume-from=*) fd="${a#--resume-from=}";; esac; done
test -n "$fd""#;

fn binary_line(sup: &Supervisor) -> String {
    let (code, out, err) = sup.ctl(&["status"]);
    assert_eq!(code, 0, "status: {err}");
    out.lines()
        .find(|l| l.starts_with("binary:"))
        .unwrap_or_else(|| panic!("no binary: line in\n{out}"))
        .to_string()
}

fn upgrade(sup: &Supervisor, binary: &Path) -> (i32, String, String) {
    sup.ctl(&["upgrade", "--wait", "--binary", binary.to_str().unwrap()])
}

/// The pidfds `pid` holds (`anon_inode:[pidfd]` in /proc/PID/fd).
fn pidfds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("pidfd"))
            })
            .count()
    })
}

#[test]
fn upgrade_under_load_keeps_the_workers_and_the_pid() {
    let dir = TempDir::new("upgrade-load");
    let port = free_port();
    let fake = FakeSystemd::new(&dir);
    // A long watchdog interval: the next ping is the one sent right after resuming.
    let sup = start(
        &dir,
        port,
        3,
        &[
            ("NOTIFY_SOCKET", fake.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "120000000"),
        ],
    );
    fake.until("READY=1", SECS(20));
    let before = workers(&sup);
    assert!(binary_line(&sup).contains(clusterctl().to_str().unwrap()));
    let next = copy_binary(&dir, "clusterctl-next");
    let load = Load::start(port, 2, 2, SECS(90), 10_000_000);
    load.wait_progress(50);
    let (code, out, err) = upgrade(&sup, &next);
    assert_eq!(code, 0, "upgrade: {out}{err}\n{}", sup.log());
    assert!(out.contains("upgraded to clusterctl"), "{out}");
    assert!(out.contains(next.to_str().unwrap()), "{out}");
    // Systemd hears from the same pid: a watchdog ping and the status, right away.
    let after_upgrade = fake.until("WATCHDOG=1", SECS(10));
    assert!(
        after_upgrade.iter().all(|(pid, _)| *pid == sup.pid()),
        "{after_upgrade:?}"
    );
    assert_eq!(sup.child.id(), u32::try_from(sup.pid()).unwrap());
    assert!(alive(sup.pid()));
    assert_eq!(
        workers(&sup),
        before,
        "no worker was replaced\n{}",
        sup.log()
    );
    assert!(
        binary_line(&sup).contains(next.to_str().unwrap()),
        "{}",
        binary_line(&sup)
    );
    // The pidfds died with the old image; the new one re-opened one per adopted worker.
    assert_eq!(
        pidfds(sup.pid()),
        before.len(),
        "one pidfd per worker after the upgrade\n{}",
        sup.log()
    );
    load.wait_progress(load.ok() + 50);
    // Upgrade again, back to the first binary (the answer names it), then reload: the
    // resumed supervisor still runs generations as before.
    let (code, out, err) = upgrade(&sup, &clusterctl());
    assert_eq!(code, 0, "second upgrade: {out}{err}\n{}", sup.log());
    assert_eq!(workers(&sup), before);
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "reload after upgrades: {out}{err}\n{}", sup.log());
    load.wait_progress(load.ok() + 50);
    let summary = load.finish();
    assert_eq!(
        summary.failed,
        0,
        "{}\n{:?}",
        summary.describe(),
        summary.errors
    );
    let after = workers(&sup);
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "the reload replaced all"
    );
    assert!(
        sup.log().matches("upgrade: resumed as clusterctl").count() == 2,
        "{}",
        sup.log()
    );
}

#[test]
fn upgrade_without_wait_answers_before_the_exec_and_finds_a_replaced_binary() {
    let dir = TempDir::new("upgrade-nowait");
    let port = free_port();
    let sup = start(&dir, port, 2, &[]);
    let before = workers(&sup);
    let next = copy_binary(&dir, "clusterctl-next");
    let (code, out, err) = sup.ctl(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("upgrading: executing"), "{out}");
    sup.wait_log("upgrade: resumed as clusterctl");
    wait_for_or(
        SECS(10),
        || {
            binary_line(&sup)
                .contains(next.to_str().unwrap())
                .then_some(())
        },
        || binary_line(&sup),
    );
    assert_eq!(workers(&sup), before);
    // A package upgrade replaces the file (rename over it): /proc/self/exe then names a
    // deleted file, and `upgrade` without --binary executes the new file at that path.
    let staged = copy_binary(&dir, "staged");
    std::fs::rename(&staged, &next).unwrap();
    let exe = std::fs::read_link(format!("/proc/{}/exe", sup.pid())).unwrap();
    assert!(
        exe.to_string_lossy().ends_with(" (deleted)"),
        "{}",
        exe.display()
    );
    let (code, out, err) = sup.ctl(&["upgrade", "--wait"]);
    assert_eq!(code, 0, "{out}{err}\n{}", sup.log());
    assert!(out.contains(next.to_str().unwrap()), "{out}");
    let exe = std::fs::read_link(format!("/proc/{}/exe", sup.pid())).unwrap();
    assert_eq!(exe, next, "runs the replaced file now");
    assert_eq!(workers(&sup), before);
}

#[test]
fn a_binary_that_cannot_run_fails_the_upgrade_and_the_service_keeps_serving() {
    let dir = TempDir::new("upgrade-bad");
    let port = free_port();
    let sup = start(&dir, port, 2, &[]);
    let before = workers(&sup);
    let garbage = dir.join("not-an-executable");
    std::fs::write(&garbage, "\x01\x02 garbage").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let no_x = dir.join("no-exec-bit");
    std::fs::copy(clusterctl(), &no_x).unwrap();
    std::fs::set_permissions(&no_x, std::fs::Permissions::from_mode(0o644)).unwrap();
    // What an older clusterctl without `upgrade` says to `upgrade --help`.
    let old_release = dir.join("old-release");
    std::fs::write(
        &old_release,
        "#!/bin/sh\necho \"error: unrecognized subcommand 'upgrade'\" >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&old_release, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (binary, why) in [
        (PathBuf::from("/nonexistent/clusterctl"), "No such file"),
        (no_x, "Permission denied"),
        // Not a program: ENOEXEC, found by the check before the exec.
        (garbage, "Exec format error"),
        // A program that is no clusterctl with `upgrade` (an old release would exit 2 on
        // --resume-from and take the workers with it): refused before the exec.
        (old_release, "cannot take over"),
    ] {
        let (code, out, err) = upgrade(&sup, &binary);
        assert_eq!(code, 1, "{}: {out}{err}", binary.display());
        assert!(err.contains(why), "{why:?} in {err}");
        assert!(err.contains("keeps running"), "{err}");
        assert_eq!(workers(&sup), before);
        http_get(port, "/").unwrap();
    }
    assert!(binary_line(&sup).contains(clusterctl().to_str().unwrap()));
    let (code, _, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_snapshot_the_new_binary_cannot_fully_read_keeps_the_workers() {
    let dir = TempDir::new("upgrade-damaged");
    let port = free_port();
    let sup = start(&dir, port, 2, &[]);
    let before = workers(&sup);
    let real = clusterctl();
    let edits = [
        // An unknown format version: only the base section is read.
        (
            "unknown-version",
            r"s/^clusterctl-handover [0-9]*$/clusterctl-handover 99/",
        ),
        // A damaged full section (its checksum no longer matches).
        ("corrupt-full", r"s/ phase=ready / phase=rEady /"),
    ];
    for (name, sed) in edits {
        let wrapper = script(
            &dir,
            name,
            &format!(
                "{FIND_FD}\nsed '{sed}' /proc/self/fd/$fd > {tmp}\ncat {tmp} > /proc/self/fd/$fd\n\
                 exec {real} \"$@\"",
                tmp = dir.join(&format!("{name}.txt")).display(),
                real = real.display()
            ),
        );
        let (code, out, err) = upgrade(&sup, &wrapper);
        assert_eq!(code, 0, "{name}: {out}{err}\n{}", sup.log());
        assert!(out.contains("from the base state only"), "{name}: {out}");
        let text = std::fs::read_to_string(dir.join(&format!("{name}.txt"))).unwrap();
        assert!(text.starts_with("clusterctl-handover"), "{text}");
        assert_eq!(workers(&sup), before, "{name}\n{}", sup.log());
        http_get(port, "/").unwrap();
    }
    assert!(
        sup.log()
            .contains("resumed from the base hand-over state only")
    );
    assert!(sup.log().contains("format 99"), "{}", sup.log());
    assert!(sup.log().contains("corrupt"), "{}", sup.log());
    // Still a working supervisor: a reload replaces the adopted workers.
    let (code, out, err) = sup.ctl(&["reload", "--wait"]);
    assert_eq!(code, 0, "{out}{err}\n{}", sup.log());
    // (A worker that does not drain is SIGKILLed after --stop-timeout, 30 s by default.)
    wait_for_or(
        SECS(60),
        || {
            let now = workers(&sup);
            (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
        },
        || format!("old workers gone\n{}", sup.log()),
    );
}

#[test]
fn a_worker_that_exits_during_the_exec_is_reaped_and_refilled() {
    let dir = TempDir::new("upgrade-exit");
    let port = free_port();
    let sup = start(&dir, port, 3, &[]);
    // Round 1: the worker is killed while no clusterctl image runs at all (between the
    // old image's execve and the new one's); the wrapper waits, with shell builtins only
    // (no child of its own to wait for), until it is a zombie: the new image reaps it.
    // Round 2: the wrapper runs a program, so the shell reaps every child, the killed
    // worker too: the new image finds it gone and handles it as lost.
    for (round, reaped_by_shell) in [(1, false), (2, true)] {
        let before = workers(&sup);
        let victim = before[1];
        let wait = if reaped_by_shell {
            format!("while kill -0 {victim} 2>/dev/null; do /bin/true; done")
        } else {
            format!(
                "i=0; while [ $i -lt 1000000 ]; do\n\
                 while IFS= read -r l; do case \"$l\" in State:*Z*) break 2;; esac; done \
                 < /proc/{victim}/status\ni=$((i+1)); done"
            )
        };
        let wrapper = script(
            &dir,
            &format!("kill-then-exec-{round}"),
            &format!(
                "kill -KILL {victim}\n{wait}\nexec {} \"$@\"",
                clusterctl().display()
            ),
        );
        let (code, out, err) = upgrade(&sup, &wrapper);
        assert_eq!(code, 0, "round {round}: {out}{err}\n{}", sup.log());
        wait_for_or(
            SECS(20),
            || {
                let now = workers(&sup);
                (now.len() == 3 && !now.contains(&victim)).then_some(now)
            },
            || format!("round {round}: slot refilled\n{}", sup.log()),
        );
        let now = workers(&sup);
        assert_eq!(now.iter().filter(|p| before.contains(p)).count(), 2);
        let log = sup.log();
        let seen = |l: &&str| {
            if reaped_by_shell {
                l.contains(&format!(
                    "worker pid {victim} was reaped during the upgrade"
                ))
            } else {
                l.contains("signal SIGKILL") && l.contains(&format!("pid {victim}"))
            }
        };
        assert!(
            log.lines().any(|l| seen(&l)),
            "round {round}: exit of {victim} in\n{log}"
        );
        http_get(port, "/").unwrap();
    }
}

#[test]
fn a_reload_in_progress_and_its_waiting_client_survive_the_upgrade() {
    let dir = TempDir::new("upgrade-reload");
    let port = free_port();
    let py = pyworker();
    // --min-uptime keeps the reload running for a while after its workers are ready.
    let sup = Run::new(&dir)
        .args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "2",
            "--min-uptime",
            "3s",
            "--",
            &py[0],
            &py[1],
        ])
        .spawn_raw();
    sup.wait_log("all 2 workers ready");
    let control = sup.control.clone();
    let waiter =
        std::thread::spawn(move || crate::support::cluster::ctl(&["reload", "--wait"], &control));
    wait_for_or(
        SECS(20),
        || {
            let (_, json, _) = sup.ctl(&["status", "--json"]);
            (json.contains("\"phase\":\"reloading\"")
                && json.matches("\"generation\":2").count() >= 2)
                .then_some(())
        },
        || format!("a reload with generation 2 running\n{}", sup.log()),
    );
    let next = copy_binary(&dir, "clusterctl-next");
    let (code, out, err) = upgrade(&sup, &next);
    assert_eq!(code, 0, "{out}{err}\n{}", sup.log());
    assert!(!out.contains("base state only"), "{out}");
    // The `reload --wait` client, handed over, gets the reload's outcome from the new image.
    let (code, out, err) = waiter.join().unwrap();
    assert_eq!(
        code,
        0,
        "reload --wait across the upgrade: {out}{err}\n{}",
        sup.log()
    );
    assert!(out.contains("generation 2 serving"), "{out}");
    let (_, json, _) = sup.ctl(&["status", "--json"]);
    assert!(json.contains("\"generation\":2"), "{json}");
    assert!(json.contains("\"last_reload\":{"), "{json}");
    wait_for_or(
        SECS(20),
        || {
            let (_, json, _) = sup.ctl(&["status", "--json"]);
            (!json.contains("\"generation\":1,")).then_some(())
        },
        || format!("the old generation gone\n{}", sup.log()),
    );
}

/// Under real systemd (252 and 257): `v252::upgrade_under_systemd_…`, `v257::…`.
mod v252 {
    #[test]
    fn upgrade_under_systemd_keeps_mainpid_workers_and_watchdog() {
        super::under_systemd(super::Version::V252);
    }
}
mod v257 {
    #[test]
    fn upgrade_under_systemd_keeps_mainpid_workers_and_watchdog() {
        super::under_systemd(super::Version::V257);
    }
}

use crate::support::systemd::{Systemd, Version};

/// The worker pids in `status --json`, sorted.
fn json_worker_pids(json: &str) -> Vec<u64> {
    let workers = &json[json
        .find("\"workers\":[")
        .expect("workers in status --json")..];
    let mut pids: Vec<u64> = workers
        .split("\"pid\":")
        .skip(1)
        .filter_map(|s| s.split([',', '}']).next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

fn under_systemd(version: Version) {
    let Some(sd) = Systemd::boot_version(version) else {
        return;
    };
    let port = free_port();
    let bin = Systemd::path(&clusterctl());
    let worker = Systemd::path(&crate::support::cluster::example("worker"));
    let listen = format!("127.0.0.1:{port}");
    sd.run_ok(&[
        &bin,
        "gen-units",
        "uapp",
        "-o",
        "/etc/systemd/system",
        "--listen",
        &listen,
        "--workers",
        "3",
        "--watchdog",
        "2s",
        "--",
        &worker,
    ]);
    sd.systemctl_ok(&["daemon-reload"]);
    sd.systemctl_ok(&["start", "uapp.socket"]);
    wait_for_or(
        SECS(30),
        || http_get(port, "/").ok(),
        || "first answer".into(),
    );
    sd.wait_for("uapp to be active", SECS(30), || {
        sd.unit_property("uapp.service", "ActiveState") == "active"
    });
    let main = sd.unit_property("uapp.service", "MainPID");
    let before = json_worker_pids(&sd.run_ok(&[&bin, "status", "--json", "uapp"]));
    assert_eq!(before.len(), 3);
    // The "new build": a copy of the binary at another path.
    sd.run_ok(&["cp", &bin, "/usr/local/bin/clusterctl-next"]);
    let load = Load::start(port, 2, 2, SECS(120), 10_000_000);
    load.wait_progress(100);
    let started = std::time::Instant::now();
    let out = sd.run_ok(&[
        &bin,
        "upgrade",
        "uapp",
        "--wait",
        "--binary",
        "/usr/local/bin/clusterctl-next",
    ]);
    let took = started.elapsed();
    assert!(out.contains("/usr/local/bin/clusterctl-next"), "{out}");
    let json = sd.run_ok(&["/usr/local/bin/clusterctl-next", "status", "--json", "uapp"]);
    assert!(
        json.contains("\"binary\":\"/usr/local/bin/clusterctl-next\""),
        "{json}"
    );
    assert_eq!(sd.unit_property("uapp.service", "MainPID"), main);
    assert_eq!(json_worker_pids(&json), before, "no worker was replaced");
    // Three watchdog intervals of traffic after the upgrade: the watchdog must not fire.
    let observe = std::time::Instant::now() + SECS(6);
    let mut seen = load.ok();
    wait_for_or(
        SECS(30),
        || {
            load.wait_progress(seen + 20);
            seen = load.ok();
            (std::time::Instant::now() >= observe).then_some(())
        },
        || "traffic for 6 s".into(),
    );
    assert_eq!(sd.unit_property("uapp.service", "NRestarts"), "0");
    assert_eq!(sd.unit_property("uapp.service", "ActiveState"), "active");
    assert_eq!(sd.unit_property("uapp.service", "MainPID"), main);
    // ExecReload= (clusterctl reload --wait) still works with the resumed supervisor.
    let r = sd.systemctl(&["reload", "uapp"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    wait_for_or(
        SECS(30),
        || {
            let json = sd.run_ok(&[&bin, "status", "--json", "uapp"]);
            let now = json_worker_pids(&json);
            (!json.contains("\"draining\"")
                && now.len() == 3
                && now.iter().all(|p| !before.contains(p)))
            .then_some(())
        },
        || "the reload to replace the workers".into(),
    );
    let s = load.finish();
    assert_eq!(s.failed, 0, "{}\n{:?}", s.describe(), s.errors);
    let journal = sd.journal(&["-u", "uapp", "-o", "cat"]);
    assert!(
        journal.contains("upgrade: resumed as clusterctl"),
        "{journal}"
    );
    eprintln!(
        "upgrade under systemd {version}: answered in {} ms; {}",
        took.as_millis(),
        s.describe()
    );
}
