//! Test probe for clusterctl's integration tests: a worker that records exactly what it
//! received from the supervisor (environment, descriptors, signal state, arguments) and
//! misbehaves on demand (never ready, crash, ignore SIGTERM, fork a child, send garbage
//! notifications, ...), so the tests can check clusterctl's side of the worker contract.
//!
//! Files, all under `$PROBE_DIR` (nothing is written when it is unset):
//! - `report.<pid>`: `key=value` lines, written to a hidden temporary file and renamed,
//!   so a reader never sees a partial report;
//! - `events`: one line per event, appended with a single `O_APPEND` write:
//!   `start <pid> <worker_id> <generation> <CLOCK_MONOTONIC ns>` and
//!   `stop <pid> <SIGNAL NAME>` (e.g. `stop 1234 SIGTERM`);
//! - `mode.<WORKER_ID>`, `mode.gen<CLUSTER_GENERATION>`, `mode` (read, first that exists;
//!   then `$PROBE_MODE`; default `ready`; an empty file also means `ready`).
//!
//! Modes: `ready`, `never-ready`, `crash`, `crash-after-ready:MS`, `ignore-term`,
//! `ready-after:MS`, `fork-child`, `no-watchdog`, `notify-garbage`, `notify-child`.
//!
//! Report caveats: Rust's runtime sets SIGPIPE to SIG_IGN before `main`, so `sigign`
//! masks that bit out (`sigign_raw` has the untouched value), and it opens /dev/null on
//! any of fds 0-2 that it finds closed.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{self as unix_net, UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{self, Command, Stdio};
use std::time::{Duration, Instant};
use std::{env, thread};

use listenfd::ListenFd;

#[path = "shared/conn.rs"]
mod conn;
use conn::Conn;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{self, SockaddrLike, SockaddrStorage};
use nix::time::{ClockId, clock_gettime};
use nix::unistd;
use sd_notify::NotifyState;

/// Bit of SIGPIPE (13) in the /proc/self/status signal masks.
const SIGPIPE_BIT: u64 = 1 << 12;
/// `O_CLOEXEC` as shown in the `flags:` line of /proc/self/fdinfo/<fd>.
const FDINFO_CLOEXEC: u32 = 0o2_000_000;
/// Largest request head read before answering anyway.
const MAX_HEAD: usize = 16 * 1024;
/// Timeout for reading a request and for writing the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let pid = process::id();
    let worker_id = env_string("WORKER_ID");
    let generation = env_string("CLUSTER_GENERATION");
    let probe_dir = env::var_os("PROBE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let tag = format!("probe {} pid {pid}", or_dash(&worker_id));

    // 1. Snapshot what the process was started with, before anything changes it.
    let fds = open_fds(pid);
    let cloexec: Vec<i32> = fds
        .iter()
        .copied()
        .filter(|&fd| fd >= 3 && has_cloexec(fd))
        .collect();
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let sigblk = status_field(&status, "SigBlk");
    let sigign_raw = status_field(&status, "SigIgn");
    let sigign = u64::from_str_radix(&sigign_raw, 16).map_or_else(
        |_| sigign_raw.clone(),
        |mask| format!("{:016x}", mask & !SIGPIPE_BIT),
    );
    let listen_pid = env_string("LISTEN_PID");
    let listen_fds = env_string("LISTEN_FDS");
    let listen_fdnames = env_string("LISTEN_FDNAMES");
    let names: Vec<&str> = listen_fdnames.split(':').collect();
    // Bounded, so that a silly LISTEN_FDS cannot keep the probe busy.
    let fd_count: usize = listen_fds.parse().unwrap_or(0).min(1024);

    let mode_text = read_mode(probe_dir.as_deref(), &worker_id, &generation);
    let mode = Mode::parse(&mode_text);

    // 2. Take the listening sockets (this marks them close-on-exec and removes
    //    LISTEN_FDS/LISTEN_PID from the environment, hence after the snapshot and before
    //    any thread exists).
    let mut listeners = Vec::new();
    let mut socknames = Vec::new();
    let mut activation = ListenFd::from_env();
    for idx in 0..fd_count {
        let fd = i32::try_from(idx + 3).unwrap_or(i32::MAX);
        let name = names
            .get(idx)
            .filter(|n| !n.is_empty())
            .map_or_else(|| "-".to_owned(), |n| (*n).to_owned());
        let (listener, addr) = take_socket(&mut activation, idx, fd);
        socknames.push((fd, addr));
        if let Some(listener) = listener {
            listeners.push((fd, name, listener));
        }
    }

    // 3. The child of fork-child mode, so that its pid goes into the report.
    let mut child_pid = None;
    if mode == Some(Mode::ForkChild) {
        match Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child_pid = Some(child.id().to_string()),
            Err(e) => log(&tag, &format!("cannot start the child: {e}")),
        }
    }

    // 4. The report and the start event.
    let mut report = String::new();
    let mut put = |key: &str, value: &str| {
        let _ = writeln!(report, "{key}={}", one_line(value));
    };
    put("pid", &pid.to_string());
    put("ppid", &unistd::getppid().to_string());
    put("pgid", &unistd::getpgrp().to_string());
    put(
        "sid",
        &unistd::getsid(None).map_or_else(|e| format!("error:{e}"), |s| s.to_string()),
    );
    put("uid", &unistd::getuid().to_string());
    put("gid", &unistd::getgid().to_string());
    put("listen_pid", &listen_pid);
    put("listen_fds", &listen_fds);
    put("listen_fdnames", &listen_fdnames);
    put("worker_id", &worker_id);
    put("cluster_workers", &env_string("CLUSTER_WORKERS"));
    put("cluster_generation", &generation);
    put("notify_socket", &env_string("NOTIFY_SOCKET"));
    put("watchdog_usec", &env_string("WATCHDOG_USEC"));
    put("watchdog_pid", &env_string("WATCHDOG_PID"));
    put("fds", &join(&fds));
    put("cloexec", &join(&cloexec));
    put("sigblk", &sigblk);
    put("sigign", &sigign);
    put("sigign_raw", &sigign_raw);
    let args: Vec<String> = env::args_os().skip(1).map(|a| encode_arg(&a)).collect();
    put("argc", &args.len().to_string());
    put("argv", &args.join(","));
    put("mode", &mode_text);
    for (fd, addr) in &socknames {
        put(&format!("sockname.{fd}"), addr);
    }
    if let Some(child) = &child_pid {
        put("child_pid", child);
    }
    if mode.is_none() {
        put("error", "unknown mode");
    }
    if let Some(dir) = &probe_dir {
        if let Err(e) = write_report(dir, pid, &report) {
            log(&tag, &format!("cannot write the report: {e}"));
        }
        let line = format!(
            "start {pid} {} {} {}",
            or_dash(&worker_id),
            or_dash(&generation),
            monotonic_ns()
        );
        append_event(dir, &line, &tag);
    }

    let Some(mode) = mode else {
        log(&tag, &format!("unknown mode {mode_text:?}"));
        process::exit(2);
    };
    if mode == Mode::Crash {
        log(&tag, "crashing as asked (mode crash)");
        process::exit(3);
    }

    // 5. Signals: collected by one thread; blocked before any thread exists so that all
    //    threads inherit the mask. In ignore-term mode SIGTERM is consumed and dropped.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    if let Err(e) = stop.thread_block() {
        log(&tag, &format!("cannot block SIGTERM/SIGINT: {e}"));
    }
    let ignore_term = mode == Mode::IgnoreTerm;
    let events_dir = probe_dir.clone();
    let signal_tag = tag.clone();
    spawn("signals", move || {
        loop {
            match stop.wait() {
                Ok(Signal::SIGTERM) if ignore_term => log(&signal_tag, "ignoring SIGTERM"),
                Ok(sig) => {
                    if let Some(dir) = &events_dir {
                        append_event(dir, &format!("stop {pid} {}", sig.as_str()), &signal_tag);
                    }
                    process::exit(0);
                }
                Err(e) => {
                    log(&signal_tag, &format!("sigwait failed: {e}"));
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });

    if mode != Mode::NoWatchdog
        && let Some(interval) = sd_notify::watchdog_enabled().filter(|i| !i.is_zero())
    {
        let period = (interval / 2).max(Duration::from_millis(1));
        spawn("watchdog", move || {
            loop {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                thread::sleep(period);
            }
        });
    }

    let answer_prefix = format!(
        "pid={pid} worker={} generation={}",
        or_dash(&worker_id),
        or_dash(&generation)
    );
    for (fd, name, listener) in listeners {
        let body = format!("{answer_prefix} fd={fd} name={name}\n");
        let listener_tag = tag.clone();
        spawn("accept", move || serve(&listener, &body, &listener_tag));
    }

    // 6. Readiness, as the mode wants it.
    let ready = || {
        let status = format!("probe {} ready", or_dash(&worker_id));
        if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
            log(&tag, &format!("cannot send READY=1: {e}"));
        }
    };
    match mode {
        Mode::Ready | Mode::IgnoreTerm | Mode::ForkChild | Mode::NoWatchdog => ready(),
        Mode::NeverReady | Mode::Crash => {}
        Mode::CrashAfterReady(pause) => {
            ready();
            thread::sleep(pause);
            log(&tag, "crashing as asked (mode crash-after-ready)");
            process::exit(3);
        }
        Mode::ReadyAfter(pause) => {
            thread::sleep(pause);
            ready();
        }
        Mode::NotifyGarbage => {
            send_garbage(&tag);
            ready();
        }
        Mode::NotifyChild => match Command::new("systemd-notify").arg("--ready").status() {
            Ok(status) if status.success() => {}
            Ok(status) => log(&tag, &format!("systemd-notify --ready failed: {status}")),
            Err(e) => log(&tag, &format!("cannot run systemd-notify: {e}")),
        },
    }
    loop {
        thread::park();
    }
}

/// The probe's modes, see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ready,
    NeverReady,
    Crash,
    CrashAfterReady(Duration),
    IgnoreTerm,
    ReadyAfter(Duration),
    ForkChild,
    NoWatchdog,
    NotifyGarbage,
    NotifyChild,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        let millis = |ms: &str| ms.parse().ok().map(Duration::from_millis);
        Some(match text {
            "ready" => Self::Ready,
            "never-ready" => Self::NeverReady,
            "crash" => Self::Crash,
            "ignore-term" => Self::IgnoreTerm,
            "fork-child" => Self::ForkChild,
            "no-watchdog" => Self::NoWatchdog,
            "notify-garbage" => Self::NotifyGarbage,
            "notify-child" => Self::NotifyChild,
            _ => {
                if let Some(ms) = text.strip_prefix("crash-after-ready:") {
                    Self::CrashAfterReady(millis(ms)?)
                } else if let Some(ms) = text.strip_prefix("ready-after:") {
                    Self::ReadyAfter(millis(ms)?)
                } else {
                    return None;
                }
            }
        })
    }
}

/// The mode text: the first of the mode files that exists, then `$PROBE_MODE`, then `ready`.
fn read_mode(dir: Option<&Path>, worker_id: &str, generation: &str) -> String {
    let mut files = Vec::new();
    if let Some(dir) = dir {
        if !worker_id.is_empty() {
            files.push(dir.join(format!("mode.{worker_id}")));
        }
        if !generation.is_empty() {
            files.push(dir.join(format!("mode.gen{generation}")));
        }
        files.push(dir.join("mode"));
    }
    let text = files
        .iter()
        .find_map(|f| fs::read_to_string(f).ok())
        .or_else(|| env::var("PROBE_MODE").ok())
        .unwrap_or_default();
    let text = text.trim();
    if text.is_empty() { "ready" } else { text }.to_owned()
}

/// A socket the probe serves HTTP on.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Takes the activated socket at `idx` and describes its local address. Datagram sockets
/// are described but not served; a socket that cannot be taken (e.g. `LISTEN_PID` was
/// not this process) is described with getsockname where possible.
fn take_socket(activation: &mut ListenFd, idx: usize, fd: i32) -> (Option<Listener>, String) {
    if let Ok(Some(l)) = activation.take_tcp_listener(idx) {
        let addr = l
            .local_addr()
            .map_or_else(|e| format!("error:{e}"), |a| a.to_string());
        return (Some(Listener::Tcp(l)), addr);
    }
    if let Ok(Some(l)) = activation.take_unix_listener(idx) {
        let addr = l
            .local_addr()
            .map_or_else(|e| format!("error:{e}"), |a| unix_addr(&a));
        return (Some(Listener::Unix(l)), addr);
    }
    if let Ok(Some(s)) = activation.take_udp_socket(idx) {
        let addr = s
            .local_addr()
            .map_or_else(|e| format!("error:{e}"), |a| a.to_string());
        // Kept open (never served) so the descriptor stays where the supervisor put it.
        std::mem::forget::<UdpSocket>(s);
        return (None, addr);
    }
    if let Ok(Some(s)) = activation.take_unix_datagram(idx) {
        let addr = s
            .local_addr()
            .map_or_else(|e| format!("error:{e}"), |a| unix_addr(&a));
        std::mem::forget::<UnixDatagram>(s);
        return (None, addr);
    }
    let addr = match socket::getsockname::<SockaddrStorage>(fd) {
        Ok(sa) => match sa.as_unix_addr() {
            Some(u) => match (u.path(), u.as_abstract()) {
                (Some(path), _) => path.display().to_string(),
                (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
                (None, None) => String::new(),
            },
            None => format!("unknown:{:?}", sa.family()),
        },
        Err(e) => format!("error:{e}"),
    };
    (None, addr)
}

fn unix_addr(addr: &unix_net::SocketAddr) -> String {
    if let Some(path) = addr.as_pathname() {
        path.display().to_string()
    } else if let Some(name) = addr.as_abstract_name() {
        format!("@{}", String::from_utf8_lossy(name))
    } else {
        String::new()
    }
}

impl Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(l) => l.as_fd(),
            Self::Unix(l) => l.as_fd(),
        }
    }
}

/// Accepts connections forever and answers each with `body` on its own thread.
///
/// Works whether or not the shared listener is in non-blocking mode: accept() blocks, or
/// returns EAGAIN and the loop waits in poll().
fn serve(listener: &Listener, body: &str, tag: &str) {
    let response = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    loop {
        let accepted = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
        };
        match accepted {
            Ok(conn) => {
                let response = response.clone();
                spawn("conn", move || answer(conn, response.as_bytes()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors or a broken socket: never spin.
                log(tag, &format!("accept failed: {e}"));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head (up to the blank line, the size limit, EOF or the timeout),
/// answers, half-closes and drains what the client still sends, then closes.
fn answer(mut conn: Conn, response: &[u8]) {
    if conn.configure(IO_TIMEOUT, IO_TIMEOUT, false).is_err() {
        return;
    }
    let mut buf = vec![0_u8; MAX_HEAD];
    let mut filled = 0;
    while filled < buf.len() {
        match conn.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    if conn.write_all(response).is_err() {
        return;
    }
    conn.shutdown_write();
    let _ = conn.configure(Duration::from_millis(200), IO_TIMEOUT, false);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(name.to_owned()).spawn(f) {
        log("probe", &format!("cannot start a {name} thread: {e}"));
    }
}

/// Sends the malformed notifications of mode notify-garbage.
fn send_garbage(tag: &str) {
    let Some(path) = env::var_os("NOTIFY_SOCKET") else {
        log(tag, "NOTIFY_SOCKET is not set, no garbage sent");
        return;
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => unix_net::SocketAddr::from_abstract_name(name),
        None => unix_net::SocketAddr::from_pathname(&path),
    };
    let sock = UnixDatagram::unbound();
    let (Ok(addr), Ok(sock)) = (addr, sock) else {
        log(tag, "cannot reach NOTIFY_SOCKET, no garbage sent");
        return;
    };
    let garbage: [&[u8]; 5] = [
        &[b'x'; 10_000],
        b"STATUS=\xff\xfe\xfd invalid utf-8\n",
        b"",
        b"STATUS=nul\0byte\n",
        b"READY=0\n",
    ];
    for message in garbage {
        if let Err(e) = sock.send_to_addr(message, &addr) {
            log(
                tag,
                &format!("garbage datagram of {} bytes: {e}", message.len()),
            );
        }
    }
}

fn write_report(dir: &Path, pid: u32, report: &str) -> io::Result<()> {
    let tmp = dir.join(format!(".report.{pid}.tmp"));
    fs::write(&tmp, report)?;
    fs::rename(&tmp, dir.join(format!("report.{pid}")))
}

/// Appends `line` to `$PROBE_DIR/events` with a single write.
fn append_event(dir: &Path, line: &str, tag: &str) {
    let mut line = line.to_owned();
    line.push('\n');
    let result = OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("events"))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = result {
        log(tag, &format!("cannot append to the events file: {e}"));
    }
}

/// The open descriptors, without the one that reads /proc/self/fd itself.
fn open_fds(pid: u32) -> Vec<i32> {
    let own_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<i32> = dir
        .filter_map(Result::ok)
        .filter(|e| fs::read_link(e.path()).ok().as_deref() != Some(&own_dir))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

fn has_cloexec(fd: i32) -> bool {
    fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .is_some_and(|flags| flags & FDINFO_CLOEXEC != 0)
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

fn monotonic_ns() -> i128 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
    })
}

/// Percent-encodes an argument: everything but printable ASCII, and `%`, space and `,`.
fn encode_arg(arg: &OsStr) -> String {
    let mut out = String::new();
    for &b in arg.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' && b != b',' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn env_string(key: &str) -> String {
    env::var_os(key)
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

/// Keeps a report value on one line.
fn one_line(value: &str) -> String {
    value.replace('\n', "%0A").replace('\r', "%0D")
}

fn join(fds: &[i32]) -> String {
    fds.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn log(tag: &str, msg: &str) {
    let _ = writeln!(io::stderr().lock(), "{tag}: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_arguments() {
        assert_eq!(encode_arg(OsStr::new("plain-arg")), "plain-arg");
        assert_eq!(encode_arg(OsStr::new("a b,c%d")), "a%20b%2Cc%25d");
        assert_eq!(encode_arg(OsStr::new("$'\"é")), "$'\"%C3%A9");
        assert_eq!(encode_arg(OsStr::new("")), "");
    }

    #[test]
    fn parses_modes() {
        assert_eq!(Mode::parse("ready"), Some(Mode::Ready));
        assert_eq!(
            Mode::parse("crash-after-ready:250"),
            Some(Mode::CrashAfterReady(Duration::from_millis(250)))
        );
        assert_eq!(
            Mode::parse("ready-after:0"),
            Some(Mode::ReadyAfter(Duration::ZERO))
        );
        assert_eq!(Mode::parse("ready-after:"), None);
        assert_eq!(Mode::parse("bogus"), None);
    }

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tprobe\nSigBlk:\t0000000000004002\nSigIgn:\t0000000000001000\n";
        assert_eq!(status_field(status, "SigBlk"), "0000000000004002");
        assert_eq!(status_field(status, "SigIgn"), "0000000000001000");
        assert_eq!(status_field(status, "SigCgt"), "");
    }
}
