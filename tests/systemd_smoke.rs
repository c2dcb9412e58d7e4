//! Smoke tests for the systemd test harness (`support::systemd`): they prove
//! that an instance boots (systemd 252; the `_257` variants also 257), runs
//! socket-activated `Type=notify` services (also heavily sandboxed ones), keeps
//! parallel instances apart and leaves nothing behind on the host, so later
//! integration tests can rely on it.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::systemd::{Systemd, Version};
use crate::support::{free_port, wait_until};

/// Socket-activated worker: takes the listening socket as fd 3, reports
/// READY=1, logs to stdout (the journal) and answers every connection with a
/// tiny HTTP response naming itself (`argv[1]`) and its uid.
const WORKER: &str = r#"import os, socket, sys

name = sys.argv[1]
listener = socket.socket(fileno=3)
print(f"{name} worker: pid {os.getpid()} uid {os.getuid()} listening on {listener.getsockname()}", flush=True)
notify = os.environ.get("NOTIFY_SOCKET")
if notify:
    if notify.startswith("@"):
        notify = "\0" + notify[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(notify)
        s.sendall(b"READY=1")
while True:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        body = f"hello from {name} uid={os.getuid()}\n".encode()
        head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode() + body)
    print(f"{name} worker: served a request", flush=True)
"#;

/// Sandboxing a clusterctl-generated unit may well use; `PrivateUsers=` is the
/// one that fails with 217/USER when systemd runs chrooted instead of pivoted.
const HARDENING: &str = "DynamicUser=yes
PrivateUsers=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
NoNewPrivileges=yes
CapabilityBoundingSet=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077
";

const TIMEOUT: Duration = Duration::from_secs(30);
/// Set for the child process run by `namespace_dies_with_the_test_process`.
const HELPER_ENV: &str = "CLUSTERCTL_HARNESS_PDEATHSIG_HELPER";
/// Precedes the host pid of PID 1 in the helper's stdout.
const HELPER_MARKER: &str = "HELPER PID1=";

#[test]
fn boots_and_reports_running_252() {
    boots_and_reports_running(Version::V252);
}

#[test]
fn boots_and_reports_running_257() {
    boots_and_reports_running(Version::V257);
}

fn boots_and_reports_running(version: Version) {
    let Some(systemd) = Systemd::boot_version(version) else {
        return;
    };
    assert_eq!(systemd.version(), version);
    let banner = systemd.systemctl(&["--version"]);
    let banner = String::from_utf8_lossy(&banner.stdout);
    assert!(
        banner.starts_with(&format!("systemd {} (", version.number())),
        "PID 1 is not {version}: {banner}"
    );
    let state = systemd.systemctl(&["is-system-running"]);
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(
        matches!(state.trim(), "running" | "degraded"),
        "is-system-running: {state}"
    );
    let comm = systemd.run(&["cat", "/proc/1/comm"]);
    assert!(comm.status.success());
    assert_eq!(String::from_utf8_lossy(&comm.stdout).trim(), "systemd");
    let host_comm = fs::read_to_string(format!("/proc/{}/comm", systemd.pid1())).unwrap();
    assert_eq!(host_comm.trim(), "systemd");
    assert_eq!(systemd.unit_property("init.scope", "ActiveState"), "active");
    let virt = systemd.run(&["systemd-detect-virt", "--container"]);
    assert_eq!(
        String::from_utf8_lossy(&virt.stdout).trim(),
        "container-other"
    );
}

#[test]
fn socket_activation_end_to_end() {
    let Some(systemd) = Systemd::boot() else {
        return;
    };
    let port = install_worker(&systemd, "smoke", "");
    systemd.systemctl_ok(&["start", "smoke.socket"]);
    assert_eq!(
        systemd.unit_property("smoke.service", "ActiveState"),
        "inactive"
    );

    let response = http_get(port);
    assert!(
        response.starts_with("HTTP/1.0 200 OK"),
        "response: {response}"
    );
    assert!(
        response.contains("hello from smoke uid=0"),
        "response: {response}"
    );

    assert_eq!(
        systemd.unit_property("smoke.service", "ActiveState"),
        "active"
    );
    let main_pid: u32 = systemd
        .unit_property("smoke.service", "MainPID")
        .parse()
        .unwrap();
    assert_ne!(main_pid, 0);
    systemd.wait_for("the worker's log line in the journal", TIMEOUT, || {
        systemd
            .journal(&["-u", "smoke.service"])
            .contains("smoke worker: served a request")
    });

    // Stop and restart through systemctl as later tests will.
    systemd.systemctl_ok(&["stop", "smoke.service", "smoke.socket"]);
    assert_eq!(systemd.unit_property("smoke.service", "MainPID"), "0");
    systemd.systemctl_ok(&["start", "smoke.socket"]);
    assert!(http_get(port).contains("hello from smoke"));
}

#[test]
fn hardened_service_with_dynamic_user_and_private_users_252() {
    hardened_service_with_dynamic_user_and_private_users(Version::V252);
}

#[test]
fn hardened_service_with_dynamic_user_and_private_users_257() {
    hardened_service_with_dynamic_user_and_private_users(Version::V257);
}

fn hardened_service_with_dynamic_user_and_private_users(version: Version) {
    let Some(systemd) = Systemd::boot_version(version) else {
        return;
    };
    let port = install_worker(&systemd, "hardened", HARDENING);
    systemd.systemctl_ok(&["start", "hardened.socket"]);

    let response = http_get(port);
    assert!(
        response.contains("hello from hardened uid="),
        "response: {response}"
    );
    assert!(
        !response.contains("uid=0\n"),
        "DynamicUser= ignored: {response}"
    );
    assert_eq!(
        systemd.unit_property("hardened.service", "SubState"),
        "running"
    );
    assert_eq!(
        systemd.unit_property("hardened.service", "ExecMainCode"),
        "0"
    );
    systemd.wait_for("the hardened worker's log line", TIMEOUT, || {
        systemd
            .journal(&["-u", "hardened.service"])
            .contains("hardened worker: served a request")
    });
}

#[test]
fn teardown_leaves_nothing_behind_252() {
    teardown_leaves_nothing_behind(Version::V252);
}

#[test]
fn teardown_leaves_nothing_behind_257() {
    teardown_leaves_nothing_behind(Version::V257);
}

fn teardown_leaves_nothing_behind(version: Version) {
    let mounts_before = host_mounts();
    let Some(systemd) = Systemd::boot_version(version) else {
        return;
    };
    let pid1 = systemd.pid1();
    let unshare = parent_of(pid1);
    assert_eq!(comm(unshare).as_deref(), Some("unshare"));
    // "0::/clusterctl-harness/<id>/init.scope"
    let cgroup = fs::read_to_string(format!("/proc/{pid1}/cgroup")).unwrap();
    let init_scope = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("cgroup2 line of PID 1");
    let instance = init_scope
        .strip_suffix("/init.scope")
        .expect("PID 1 lives in init.scope");
    let id = instance.rsplit('/').next().unwrap().to_owned();
    assert!(
        instance.starts_with("/clusterctl-harness/"),
        "systemd is not confined to its own cgroup: {instance}"
    );
    let leftovers = || {
        let mut found: Vec<PathBuf> = cgroup_dirs_of(instance);
        let temp = std::env::temp_dir().join(format!("clusterctl-harness-{id}"));
        if temp.exists() {
            found.push(temp);
        }
        found
    };
    assert!(!leftovers().is_empty());
    assert_eq!(host_mounts(), mounts_before, "mounts leaked to the host");

    drop(systemd);

    for pid in [pid1, unshare] {
        assert!(
            !matches!(comm(pid).as_deref(), Some("systemd" | "unshare")),
            "pid {pid} still running"
        );
    }
    assert_eq!(host_mounts(), mounts_before, "mounts leaked to the host");
    assert_eq!(leftovers(), Vec::<PathBuf>::new());
}

#[test]
fn parallel_instances_are_isolated() {
    // Both on this thread: PDEATHSIG is tied to the thread that booted.
    let Some(first) = Systemd::boot() else {
        return;
    };
    let Some(second) = Systemd::boot() else {
        return;
    };
    for systemd in [&first, &second] {
        systemd.write_file(
            "/etc/systemd/system/iso.service",
            b"[Service]\nExecStart=/bin/sleep infinity\n",
        );
        systemd.systemctl_ok(&["daemon-reload"]);
        systemd.systemctl_ok(&["start", "iso.service"]);
    }
    let first_cgroup = first.unit_property("iso.service", "ControlGroup");
    let second_cgroup = second.unit_property("iso.service", "ControlGroup");
    assert_ne!(first_cgroup, second_cgroup);
    let second_procs = host_cgroup_procs(&second_cgroup);
    assert_eq!(second_procs.len(), 1, "{second_cgroup}: {second_procs:?}");
    assert_eq!(host_cgroup_procs(&first_cgroup).len(), 1);

    first.systemctl_ok(&["stop", "iso.service"]);

    assert_eq!(
        first.unit_property("iso.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(second.unit_property("iso.service", "ActiveState"), "active");
    assert_eq!(host_cgroup_procs(&second_cgroup), second_procs);
    assert_eq!(comm(second_procs[0]).as_deref(), Some("sleep"));
}

#[test]
fn namespace_dies_with_the_test_process() {
    // Skips (or fails in CI) like every other test when booting is impossible.
    let Some(gate) = Systemd::boot() else {
        return;
    };
    drop(gate);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "--nocapture", "--test-threads=1"])
        .arg("systemd_smoke::pdeathsig_helper")
        .env(HELPER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // libtest may print "test … ... " on the same line before the marker.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, pid1)) = line.split_once(HELPER_MARKER) {
                let _ = tx.send(pid1.trim().to_owned());
            }
        }
    });
    let Ok(pid1) = rx.recv_timeout(Duration::from_secs(90)) else {
        let _ = child.kill();
        panic!("helper process never reported a booted instance");
    };
    let pid1: u32 = pid1.parse().unwrap();
    let unshare = parent_of(pid1);
    // The helper's first (only) instance is "<its pid>-0".
    let id = format!("{}-0", child.id());
    let mut leftovers = cgroup_dirs_of(&format!("/clusterctl-harness/{id}"));
    assert!(!leftovers.is_empty(), "helper instance has no cgroup");
    leftovers.push(std::env::temp_dir().join(format!("clusterctl-harness-{id}")));
    assert!(leftovers.iter().all(|dir| dir.exists()));
    assert_eq!(comm(pid1).as_deref(), Some("systemd"));

    child.kill().unwrap(); // SIGKILL: no Drop, no unwinding.
    child.wait().unwrap();

    wait_until(
        Instant::now() + TIMEOUT,
        "the helper's unshare and systemd to die",
        || comm(pid1).as_deref() != Some("systemd") && comm(unshare).as_deref() != Some("unshare"),
    );
    // What the killed process could not clean up is swept by the next boot.
    let Some(next) = Systemd::boot() else {
        return;
    };
    drop(next);
    let still_there: Vec<_> = leftovers.iter().filter(|dir| dir.exists()).collect();
    assert!(still_there.is_empty(), "not swept: {still_there:?}");
}

/// Run only as a child of `namespace_dies_with_the_test_process`: boots,
/// reports PID 1 and waits to be SIGKILLed.
#[test]
#[ignore = "helper process for namespace_dies_with_the_test_process"]
fn pdeathsig_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let systemd = Systemd::boot().expect("helper could not boot");
    println!("{HELPER_MARKER}{}", systemd.pid1());
    // Not synchronization: just outlive the parent's check, boundedly.
    thread::sleep(Duration::from_secs(120));
}

/// Installs `/opt/<name>/worker.py`, `<name>.socket` on a free port and
/// `<name>.service` (with `extra` in its `[Service]` section), reloads, and
/// returns the port.
fn install_worker(systemd: &Systemd, name: &str, extra: &str) -> u16 {
    let port = free_port();
    let python = python();
    systemd.write_file(&format!("/opt/{name}/worker.py"), WORKER.as_bytes());
    systemd.write_file(
        &format!("/etc/systemd/system/{name}.socket"),
        format!("[Socket]\nListenStream=127.0.0.1:{port}\n").as_bytes(),
    );
    systemd.write_file(
        &format!("/etc/systemd/system/{name}.service"),
        format!(
            "[Unit]\nRequires={name}.socket\nAfter={name}.socket\n\n\
             [Service]\nType=notify\nExecStart={python} -u /opt/{name}/worker.py {name}\n{extra}"
        )
        .as_bytes(),
    );
    systemd.systemctl_ok(&["daemon-reload"]);
    port
}

/// An absolute path to a Python 3 interpreter that also works inside
/// sandboxed units (so not one under /root, which `ProtectHome=` hides).
fn python() -> String {
    if Path::new("/usr/bin/python3").is_file() {
        return "/usr/bin/python3".to_owned();
    }
    let output = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed by the smoke tests");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn http_get(port: u16) -> String {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|err| panic!("read response from {addr}: {err}"));
    response
}

/// The host's mount table, without the per-mount ids' ordering mattering.
fn host_mounts() -> BTreeSet<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|comm| comm.trim_end().to_owned())
}

fn parent_of(pid: u32) -> u32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // "pid (comm) state ppid ..."; comm may contain spaces, so split after ')'.
    let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
    after_comm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Existing directories for cgroup `path` in the host's cgroup hierarchies.
fn cgroup_dirs_of(path: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .filter_map(Result::ok)
        .map(|hierarchy| hierarchy.path().join(path.trim_start_matches('/')))
        .chain([Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))])
        .filter(|dir| dir.is_dir())
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Host pids in cgroup `path`, read from the first hierarchy that has it.
fn host_cgroup_procs(path: &str) -> Vec<u32> {
    let dirs = cgroup_dirs_of(path);
    let dir = dirs.first().unwrap_or_else(|| panic!("no cgroup {path}"));
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap()
        .lines()
        .map(|pid| pid.parse().unwrap())
        .collect()
}
