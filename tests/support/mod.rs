//! Shared helpers for the single `integration` test binary (see `tests/lib.rs`).
//!
//! `systemd` boots a throw-away systemd as PID 1 in private namespaces; the small
//! free functions here are generic polling and networking helpers that tests and
//! the harness share.

pub mod cluster;
pub mod load;
pub mod systemd;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How often the polling helpers re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`, 32768+ by default).
///
/// Not an ephemeral port on purpose: the load tests open thousands of client connections
/// from ephemeral ports, and on loopback a client whose local port equals a server's port
/// can collide with the mirrored 4-tuple of another connection. The port is released
/// before returning, so another process could grab it in between; distinct tests get
/// distinct ports from a per-process counter.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread concurrent test processes over the range by pid.
    let base = 20_000 + u16::try_from(std::process::id() % 50).unwrap_or(0) * 200;
    for _ in 0..12_000 {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1")
}

/// Calls `condition` every [`POLL_INTERVAL`] until it returns `true` (then returns
/// `true`) or `deadline` has passed (then returns `false`). The condition is always
/// evaluated at least once, and once more after the deadline.
pub fn poll_until(deadline: Instant, mut condition: impl FnMut() -> bool) -> bool {
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Like [`poll_until`], but panics with `what` when the deadline passes.
pub fn wait_until(deadline: Instant, what: &str, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(deadline, condition),
        "timed out waiting for: {what}"
    );
}

/// Runs `cmd` to completion like [`Command::output`], feeding it `input` on stdin
/// (or `/dev/null`), but never for longer than `timeout`.
///
/// The command gets its own process group. On timeout the whole group is
/// SIGKILLed (this also reaches the grandchildren that e.g. `nsenter --pid`
/// forks) and an [`io::ErrorKind::TimedOut`] error carrying whatever output was
/// collected is returned. If the command exits but something it left behind
/// keeps its stdout/stderr open past the deadline, that group is killed too.
pub fn output_with_deadline(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<Output> {
    let mut deadline = Instant::now() + timeout;
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let mut child = cmd.spawn()?;
    let group = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));

    if let (Some(data), Some(mut pipe)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        // Detached on purpose: it ends when the data is written or the pipe breaks.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    for (index, mut pipe) in [
        (0, Box::new(stdout) as Box<dyn Read + Send>),
        (1, Box::new(stderr)),
    ] {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send((index, bytes));
        });
    }
    drop(tx);

    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = killpg(group, Signal::SIGKILL);
            killed = true;
            break child.wait()?;
        }
        thread::sleep(POLL_INTERVAL);
    };

    let mut streams: [Option<Vec<u8>>; 2] = [None, None];
    while streams.iter().any(Option::is_none) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((index, bytes)) => streams[index] = Some(bytes),
            Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                let _ = killpg(group, Signal::SIGKILL);
                killed = true;
                deadline = Instant::now() + Duration::from_secs(5);
            }
            Err(_) => break,
        }
    }
    let [stdout, stderr] = streams.map(Option::unwrap_or_default);
    if killed {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "timed out after {timeout:?} (process group killed); stdout so far:\n{}\nstderr so far:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
        ));
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A counting semaphore that bounds how many of the heaviest tests run at once, so that on
/// a 2-core CI machine the tests running real servers under load do not starve each other
/// into timing failures (timer readiness, broken-deploy detection). Waiting for a permit is
/// not synchronisation on the system under test; it only spaces the tests out.
pub struct Permits {
    name: &'static str,
    limit: usize,
    taken: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// Held while a permit is taken; gives it back when dropped (also when the test panics).
pub struct Permit<'a>(&'a Permits);

impl Permits {
    pub const fn new(name: &'static str, limit: usize) -> Permits {
        Permits {
            name,
            limit,
            taken: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Blocks until a permit is free (at most 20 minutes: a leaked permit is a bug).
    pub fn take(&self) -> Permit<'_> {
        let deadline = Instant::now() + Duration::from_secs(1200);
        let mut taken = self
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *taken >= self.limit {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {} permit within 20 minutes", self.name);
            taken = self
                .freed
                .wait_timeout(taken, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        *taken += 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut taken = self
            .0
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *taken -= 1;
        self.0.freed.notify_one();
    }
}

/// Tests that boot a real server (gunicorn, Puma, Node, …) in a systemd instance and put it
/// under load: at most 3 at once.
pub static SERVER_TESTS: Permits = Permits::new("server test", 3);

/// Load generators (`load::Load`): at most 2 at once.
pub static LOAD_GENERATORS: Permits = Permits::new("load generator", 2);

/// `CI` set to anything but empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Reports a test that cannot run on this machine: with `CI` set that is a failure (CI
/// installs every prerequisite, see scripts/test.sh); otherwise it prints `SKIPPED: …`
/// straight to fd 2 (libtest's capture would hide a print macro's output), which
/// scripts/test.sh counts. The caller returns right after.
pub fn skip(reason: &str) {
    assert!(!in_ci(), "this test must run in CI, but: {reason}");
    let _ = writeln!(io::stderr(), "SKIPPED: {reason}");
}

/// The `i`-th datagram of a hostile flood of a notify socket: fake readiness and MAINPID
/// from a stranger, binary garbage, an oversized message (every 100th) and a stranger's
/// STATUS= text (`stranger`, which must never show up in `status`).
pub fn hostile_notify(i: u32) -> Vec<u8> {
    match i % 5 {
        0 => b"READY=1\nMAINPID=1\nSTOPPING=1\nWATCHDOG=1".to_vec(),
        1 => (0..200u32)
            .map(|j| u8::try_from((i.wrapping_mul(31) + j) % 256).unwrap_or(0))
            .collect(),
        2 if i % 100 == 2 => vec![b'x'; 150_000],
        _ => b"STATUS=stranger".to_vec(),
    }
}

/// One worker row of `status --json`: (pid, generation, state); the backing-off rows
/// (no pid) are left out.
pub fn status_rows(json: &str) -> Vec<(i32, u32, String)> {
    let Some(workers) = json.split("\"workers\":[").nth(1) else {
        return Vec::new();
    };
    workers
        .split("{\"slot\":")
        .skip(1)
        .filter_map(|row| {
            let field = |key: &str| {
                let rest = row.split(&format!("\"{key}\":")).nth(1)?;
                Some(rest.split([',', '}']).next()?.trim_matches('"').to_string())
            };
            Some((
                field("pid")?.parse().ok()?,
                field("generation")?.parse().ok()?,
                field("state")?,
            ))
        })
        .collect()
}

/// The first number after `"key":` in a JSON text (`status --json`), if any.
pub fn json_number(json: &str, key: &str) -> Option<u64> {
    let rest = json.split(&format!("\"{key}\":")).nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `NOTIFY_SOCKET` a running process (a worker) was given, from `/proc/PID/environ`.
pub fn notify_socket_of(pid: i32) -> std::path::PathBuf {
    std::fs::read(format!("/proc/{pid}/environ"))
        .expect("read /proc/PID/environ")
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| std::path::PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .expect("NOTIFY_SOCKET in the environment")
}
