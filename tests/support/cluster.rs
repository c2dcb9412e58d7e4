//! Helpers to run the real `clusterctl` binary with the probe worker (examples/probe.rs):
//! temp dirs, free ports, a supervisor handle that never leaks processes, probe reports,
//! a notify socket standing in for systemd's, and a tiny HTTP client. Every wait has a
//! deadline.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn clusterctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clusterctl"))
}

/// An example program built by cargo next to the binary (`cargo test` builds examples).
pub fn example(name: &str) -> PathBuf {
    let p = clusterctl().parent().unwrap().join("examples").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --examples`",
        p.display()
    );
    p
}

pub fn probe() -> PathBuf {
    example("probe")
}

/// A private directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "clusterctl-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use super::free_port;

/// Polls `f` every 20 ms until it returns `Some`, or panics naming `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_or(timeout, f, || what.to_string())
}

/// Like `wait_for`, with the failure description computed at the deadline.
pub fn wait_for_or<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    what: impl FnOnce() -> String,
) -> T {
    let mut value = None;
    let found = super::poll_until(Instant::now() + timeout, || {
        value = f();
        value.is_some()
    });
    assert!(found, "timed out after {timeout:?} waiting for {}", what());
    value.expect("poll_until returned true")
}

pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes: it runs nothing and holds no socket.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// A running `clusterctl run`. Dropping it SIGKILLs it (workers follow through
/// PR_SET_PDEATHSIG).
pub struct Supervisor {
    pub child: Child,
    pub log: PathBuf,
    pub probe_dir: PathBuf,
    pub control: PathBuf,
    status: Option<ExitStatus>,
}

pub struct Run {
    args: Vec<String>,
    env: Vec<(String, String)>,
    cmd: Vec<String>,
    dir: PathBuf,
}

impl Run {
    /// `clusterctl run ARGS -- probe`, with PROBE_DIR and a control socket in `dir`.
    pub fn new(dir: &TempDir) -> Run {
        Run {
            args: Vec::new(),
            env: Vec::new(),
            cmd: Vec::new(),
            dir: dir.path().to_path_buf(),
        }
    }

    pub fn args(mut self, a: &[&str]) -> Run {
        self.args.extend(a.iter().map(|s| (*s).to_string()));
        self
    }

    /// `--listen 127.0.0.1:PORT --workers N`.
    pub fn workers_on(self, port: u16, workers: u32) -> Run {
        self.args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            &workers.to_string(),
        ])
    }

    /// `--listen 127.0.0.1:<a free port> --workers N`.
    pub fn workers_on_free_port(self, workers: u32) -> Run {
        self.workers_on(free_port(), workers)
    }

    pub fn env(mut self, k: &str, v: &str) -> Run {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Spawns with the command given after `--` in `args` (instead of the probe).
    pub fn spawn_raw(mut self) -> Supervisor {
        if let Some(i) = self.args.iter().position(|a| a == "--") {
            self.cmd = self.args.split_off(i + 1);
            self.args.pop();
        }
        self.spawn()
    }

    pub fn spawn(mut self) -> Supervisor {
        if self.cmd.is_empty() {
            self.cmd = vec![probe().display().to_string()];
        }
        let log = self.dir.join("supervisor.log");
        let control = self.dir.join("control.sock");
        let mut c = Command::new(clusterctl());
        c.arg("run")
            .args(&self.args)
            .arg("--control")
            .arg(&control)
            .arg("--log")
            .arg("stderr")
            .arg("--")
            .args(&self.cmd)
            .env("PROBE_DIR", &self.dir)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("RUNTIME_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let child = c.spawn().expect("spawn clusterctl");
        Supervisor {
            child,
            log,
            probe_dir: self.dir,
            control,
            status: None,
        }
    }
}

pub type Report = HashMap<String, String>;

impl Supervisor {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// All probe reports written so far, by pid.
    pub fn reports(&self) -> HashMap<i32, Report> {
        read_reports(&self.probe_dir)
    }

    /// Waits until `n` live workers of `generation` have written their report.
    pub fn wait_workers(&self, n: usize, generation: u32) -> Vec<Report> {
        let gen_text = generation.to_string();
        wait_for_or(
            Duration::from_secs(20),
            || {
                let mut live: Vec<Report> = self
                    .reports()
                    .into_iter()
                    .filter(|(pid, r)| alive(*pid) && r["cluster_generation"] == gen_text)
                    .map(|(_, r)| r)
                    .collect();
                live.sort_by_key(|r| r["worker_id"].parse::<u32>().unwrap_or(u32::MAX));
                (live.len() == n).then_some(live)
            },
            || {
                format!(
                    "{n} live workers of generation {generation}\n{}",
                    self.log()
                )
            },
        )
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_for_or(
            Duration::from_secs(20),
            || self.log().contains(needle).then_some(()),
            || format!("log line {needle:?} in\n{}", self.log()),
        );
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the supervisor to exit (deadline 40 s) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let log = self.log.clone();
        let child = &mut self.child;
        let s = wait_for_or(
            Duration::from_secs(40),
            || child.try_wait().unwrap(),
            || {
                format!(
                    "supervisor exit\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            },
        );
        self.status = Some(s);
        s
    }

    /// Runs `clusterctl ARGS --control <ours>` and returns (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(args, &self.control)
    }

    /// `clusterctl status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        status_json(&self.control)
    }
}

/// How long a control command may take (a `reload --wait` included) before the test fails.
pub const CTL_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `clusterctl ARGS --control CONTROL` and returns (exit code, stdout, stderr); fails
/// the test (and kills the client) after `CTL_DEADLINE`.
pub fn ctl(args: &[&str], control: &Path) -> (i32, String, String) {
    let child = Command::new(clusterctl())
        .args(args)
        .arg("--control")
        .arg(control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(CTL_DEADLINE) else {
        // Our own child, by pid (its waiting thread reaps it).
        if let Ok(p) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        panic!("clusterctl {args:?} did not finish within {CTL_DEADLINE:?}");
    };
    let out = out.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `clusterctl status --json` on CONTROL, parsed (fails the test on an error answer).
pub fn status_json(control: &Path) -> serde_json::Value {
    let (code, out, err) = ctl(&["status", "--json"], control);
    assert_eq!(code, 0, "status --json failed: {out}{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// The rows of `workers` in a status report.
pub fn status_workers(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["workers"].as_array().cloned().unwrap_or_default()
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn read_reports(dir: &Path) -> HashMap<i32, Report> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("report.").and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let r: Report = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.insert(pid, r);
    }
    out
}

/// `start` lines of the probe's events file: (pid, worker_id, generation, monotonic ns).
pub fn starts(dir: &Path) -> Vec<(i32, u32, u32, u64)> {
    std::fs::read_to_string(dir.join("events"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"start") && f.len() >= 5).then(|| {
                (
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap_or(u32::MAX),
                    f[3].parse().unwrap_or(0),
                    f[4].parse().unwrap(),
                )
            })
        })
        .collect()
}

/// One HTTP/1.0 GET to 127.0.0.1:port; the body, or the error.
pub fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("short response {buf:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("bad status: {head}"));
    }
    Ok(body.to_string())
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET, with sender credentials.
pub struct FakeSystemd {
    sock: std::os::fd::OwnedFd,
    pub path: PathBuf,
}

impl FakeSystemd {
    pub fn new(dir: &TempDir) -> FakeSystemd {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, UnixAddr, bind, setsockopt, socket, sockopt,
        };
        use std::os::fd::AsRawFd;
        let path = dir.join("systemd-notify.sock");
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&sock, sockopt::PassCred, &true).unwrap();
        bind(sock.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        FakeSystemd { sock, path }
    }

    /// Next datagram within `timeout`: (sender pid, text).
    pub fn recv(&self, timeout: Duration) -> Option<(i32, String)> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::{AsFd, AsRawFd};
        let mut fds = [nix::poll::PollFd::new(
            self.sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        if nix::poll::poll(&mut fds, ms).ok()? == 0 {
            return None;
        }
        let mut buf = vec![0u8; 8192];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .ok()?;
        let mut pid = 0;
        for c in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmCredentials(cr) = c {
                pid = cr.pid();
            }
        }
        let n = msg.bytes;
        Some((pid, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }

    /// Collects datagrams until one contains `needle` (deadline `timeout`).
    pub fn until(&self, needle: &str, timeout: Duration) -> Vec<(i32, String)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now())) {
                let done = m.1.contains(needle);
                got.push(m);
                if done {
                    return got;
                }
            }
        }
        panic!("no datagram with {needle:?} within {timeout:?}; got {got:?}");
    }
}

pub fn exit_code(s: ExitStatus) -> i32 {
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    u64::try_from(t.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap()
}
