//! Demo worker for clusterctl: a small, thread-based HTTP/1.1 server that follows the
//! clusterctl worker contract, so there is a real program to supervise in the docs, in
//! manual tests and in benchmarks.
//!
//! Contract, as implemented here:
//! - sockets: takes every socket passed with `LISTEN_FDS`/`LISTEN_PID` (TCP or unix
//!   stream listeners, names from `LISTEN_FDNAMES`); without socket activation it binds
//!   `--bind ADDR` itself (`--reuse-port` sets `SO_REUSEPORT` first), which is the
//!   "N processes bind the port themselves" benchmark baseline;
//! - readiness: `READY=1` once the listeners are served, `WATCHDOG=1` every half
//!   `WATCHDOG_USEC` when asked to;
//! - drain: SIGTERM, SIGINT or SIGQUIT stop accepting, let in-flight requests finish
//!   (their responses carry `Connection: close`), close idle keep-alive connections and
//!   exit 0 when the last connection is gone, or after `--drain-timeout` (30 s) at most.
//!
//! Shared listening sockets are never shut down and never switched to non-blocking mode
//! (`O_NONBLOCK` lives on the open file description, which other workers and systemd
//! share); the worker only stops accepting and closes its own descriptors.
//!
//! Accept threads sit in a blocking `accept4()`. The drain gets each of them out with a
//! private wake-up signal (SIGUSR2, a no-op handler installed without `SA_RESTART`, so the
//! blocked accept4 fails with EINTR), sent to every accept thread again and again until
//! each has returned, and joins them before it waits for the open connections: a
//! connection that an accept thread took at the last moment is served, never reset by
//! the exit.
//!
//! Responses: `/health` answers `ok`, `/sleep/<ms>` sleeps (at most 60 s) and then answers
//! like every other path: `worker=<id> pid=<pid> generation=<gen> socket=<name>`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{env, process, thread};

use listenfd::ListenFd;

#[path = "shared/conn.rs"]
mod conn;
use conn::Conn;
use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, sockopt,
};
use sd_notify::NotifyState;

/// Largest accepted request head (request line and headers, including the final CRLF).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body the worker is willing to read and discard.
const MAX_BODY: u64 = 64 * 1024 * 1024;
/// Upper bound for `/sleep/<ms>`.
const MAX_SLEEP_MS: u64 = 60_000;
/// Read timeout on connections: how often a waiting connection looks at the drain flag.
const READ_TICK: Duration = Duration::from_millis(200);
/// A write that makes no progress for this long gives up on the client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(75);
/// Time allowed to receive a complete request head, or for a body to make progress.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// After a `Connection: close` response, unread client data is drained for at most this
/// long so that closing does not turn into a reset that destroys the response.
const LINGER: Duration = Duration::from_secs(1);
/// Default upper bound for the drain after a stop signal.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Stack size of connection threads; buffers live on the heap.
const CONN_STACK: usize = 128 * 1024;
/// Pause after accept() failed for lack of resources (EMFILE and friends), so a full fd
/// table does not turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Private signal that interrupts an accept thread's blocking accept4() during the drain.
/// Only the accept threads leave it unblocked.
const WAKE_SIGNAL: Signal = Signal::SIGUSR2;
/// During the drain, the wake-up signal is sent to every accept thread still running this
/// often: a signal that arrives between the thread's look at the drain flag and its entry
/// into accept4() is lost, the next one is not.
const WAKE_EVERY: Duration = Duration::from_millis(10);
/// How often the drain looks whether the accept threads have returned.
const WAKE_CHECK: Duration = Duration::from_millis(1);

const USAGE: &str = "usage: worker [--bind ADDR]... [--reuse-port] [--drain-timeout SECS]

Serves HTTP/1.1 on the sockets passed by clusterctl or systemd (LISTEN_FDS), or,
without socket activation, on sockets it binds itself with --bind (repeatable,
e.g. 127.0.0.1:8080 or [::1]:8080); --reuse-port sets SO_REUSEPORT before bind.
SIGTERM, SIGINT or SIGQUIT drain the worker: it stops accepting, finishes in-flight
requests, closes keep-alive connections and exits 0 (after --drain-timeout, default
30 s, at the latest).";

fn main() {
    let ident = Identity::from_env();
    let opts = match Options::parse(env::args_os().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{USAGE}");
            process::exit(0);
        }
        Err(msg) => {
            log(&format!("worker: {msg}\n{USAGE}"));
            process::exit(2);
        }
    };

    // Block the stop signals before any thread exists: every thread inherits the mask,
    // so the signals stay pending until the main thread collects them with sigwait. The
    // wake-up signal is blocked too; only the accept threads unblock it.
    let stop_signals = stop_signal_set();
    let mut blocked = stop_signals;
    blocked.add(WAKE_SIGNAL);
    if let Err(e) = blocked.thread_block() {
        ident.log(&format!("cannot block signals: {e}"));
        process::exit(1);
    }
    if let Err(e) = install_wake_handler() {
        ident.log(&format!(
            "cannot install the {} handler: {e}",
            WAKE_SIGNAL.as_str()
        ));
        process::exit(1);
    }

    let sockets = match collect_sockets(&opts, &ident) {
        Ok(sockets) if !sockets.is_empty() => sockets,
        Ok(_) => {
            ident.log(
                "no listening sockets: pass them with LISTEN_FDS (socket activation) \
                 or use --bind ADDR",
            );
            process::exit(2);
        }
        Err(msg) => {
            ident.log(&msg);
            process::exit(2);
        }
    };

    let shared = Arc::new(Shared::default());
    let count = sockets.len();
    let mut acceptors = Vec::with_capacity(count);
    for sock in sockets {
        shared.lock().acceptors += 1;
        let shared_for_thread = Arc::clone(&shared);
        let ident_for_thread = ident.clone();
        let spawned = thread::Builder::new()
            .name(format!("accept-{}", sock.name))
            .spawn(move || accept_loop(&sock, &shared_for_thread, &ident_for_thread));
        match spawned {
            Ok(handle) => acceptors.push(handle),
            Err(e) => {
                ident.log(&format!("cannot start an accept thread: {e}"));
                process::exit(1);
            }
        }
    }

    start_watchdog(&ident);

    let status = format!("serving on {count} socket(s)");
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
        ident.log(&format!("cannot send READY=1: {e}"));
    }
    log(&format!(
        "worker {} pid {} generation {} ready",
        ident.worker, ident.pid, ident.generation
    ));

    let signal = wait_for_stop_signal(&stop_signals, &ident);
    drain(signal, &shared, acceptors, opts.drain_timeout, &ident);
}

/// Who this worker is, for responses and log lines (`-` for missing values).
#[derive(Clone, Debug)]
struct Identity {
    worker: String,
    pid: u32,
    generation: String,
}

impl Identity {
    fn from_env() -> Self {
        Self {
            worker: env_or_dash("WORKER_ID"),
            pid: process::id(),
            generation: env_or_dash("CLUSTER_GENERATION"),
        }
    }

    fn log(&self, msg: &str) {
        log(&format!("worker {} pid {}: {msg}", self.worker, self.pid));
    }

    /// The response body for requests that arrive on the socket called `socket`.
    fn body(&self, socket: &str) -> Arc<[u8]> {
        format!(
            "worker={} pid={} generation={} socket={socket}\n",
            self.worker, self.pid, self.generation
        )
        .into_bytes()
        .into()
    }
}

fn env_or_dash(key: &str) -> String {
    match env::var(key) {
        Ok(v) if !v.is_empty() && !v.chars().any(char::is_whitespace) => v,
        _ => "-".to_owned(),
    }
}

/// Writes one line to stderr with a single write(2), so that lines of workers sharing the
/// supervisor's stderr do not interleave; never panics (unlike `eprintln!` on a broken
/// pipe).
fn log(msg: &str) {
    let mut line = String::with_capacity(msg.len() + 1);
    line.push_str(msg);
    line.push('\n');
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// Command line options.
#[derive(Debug)]
struct Options {
    binds: Vec<SocketAddr>,
    reuse_port: bool,
    drain_timeout: Duration,
}

impl Options {
    /// Parses the arguments after argv[0]; `Ok(None)` means `--help`.
    fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Option<Self>, String> {
        let mut opts = Self {
            binds: Vec::new(),
            reuse_port: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let arg = arg
                .into_string()
                .map_err(|a| format!("argument {} is not valid UTF-8", a.display()))?;
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                match inline {
                    Some(v) => Ok(v.to_owned()),
                    None => args
                        .next()
                        .and_then(|v| v.into_string().ok())
                        .ok_or_else(|| format!("{name} needs a value")),
                }
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--bind" => {
                    let v = value("--bind")?;
                    let addr = v.parse().map_err(|_| {
                        format!("--bind {v}: not an address like 127.0.0.1:8080 or [::1]:8080")
                    })?;
                    opts.binds.push(addr);
                }
                "--reuse-port" if inline.is_none() => opts.reuse_port = true,
                "--drain-timeout" => {
                    let v = value("--drain-timeout")?;
                    let secs: f64 = v
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
                        .ok_or_else(|| format!("--drain-timeout {v}: not a number of seconds"))?;
                    opts.drain_timeout = Duration::from_secs_f64(secs);
                }
                _ => return Err(format!("unknown argument {arg}")),
            }
        }
        Ok(Some(opts))
    }
}

/// A listening socket and what the worker knows about it.
#[derive(Debug)]
struct Socket {
    listener: Listener,
    /// Fd name from `LISTEN_FDNAMES`, or the `--bind` address.
    name: String,
    /// Bound by this process (`--bind`): not shared, so once accepting stops it is made
    /// non-blocking and the connections still queued on it are accepted and served before
    /// it is closed.
    owned: bool,
    body: Arc<[u8]>,
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// One accept4() call, without std's automatic retry on EINTR: the wake-up signal must
    /// be able to get the thread out. Accepted sockets are blocking and close-on-exec.
    fn accept(&self) -> Result<Conn, Errno> {
        let raw = socket::accept4(self.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor, open and owned by nothing else;
        // the OwnedFd takes sole ownership of it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(match self {
            Self::Tcp(_) => Conn::Tcp(TcpStream::from(fd)),
            Self::Unix(_) => Conn::Unix(UnixStream::from(fd)),
        })
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l) => l.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.set_nonblocking(true),
            Self::Unix(l) => l.set_nonblocking(true),
        }
    }
}

/// Gathers the listening sockets: the inherited ones when socket-activated, else `--bind`.
fn collect_sockets(opts: &Options, ident: &Identity) -> Result<Vec<Socket>, String> {
    if let Some(sockets) = inherited_sockets(ident)? {
        if !opts.binds.is_empty() {
            ident.log("socket-activated: ignoring --bind");
        }
        return Ok(sockets);
    }
    opts.binds
        .iter()
        .map(|&addr| {
            let listener = bind_tcp(addr, opts.reuse_port)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let name = addr.to_string();
            Ok(Socket {
                listener: Listener::Tcp(listener),
                body: ident.body(&name),
                name,
                owned: true,
            })
        })
        .collect()
}

/// Takes the sockets passed with `LISTEN_FDS`, if they are meant for this process.
///
/// Must run before any thread is started: listenfd removes `LISTEN_FDS`/`LISTEN_PID` from
/// the environment.
fn inherited_sockets(ident: &Identity) -> Result<Option<Vec<Socket>>, String> {
    let Some(count) = env::var_os("LISTEN_FDS") else {
        return Ok(None);
    };
    let count: usize = count
        .to_str()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("invalid LISTEN_FDS={}", count.display()))?;
    let listen_pid = env::var("LISTEN_PID").unwrap_or_default();
    if listen_pid.parse::<u32>().ok() != Some(ident.pid) {
        ident.log(&format!(
            "ignoring LISTEN_FDS={count}: LISTEN_PID={listen_pid} is not this process"
        ));
        return Ok(None);
    }
    let names = env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();

    let mut fds = ListenFd::from_env();
    let mut sockets = Vec::with_capacity(count);
    for idx in 0..fds.len() {
        let fd = 3 + idx;
        let name = match names.get(idx) {
            Some(n) if !n.is_empty() && !n.chars().any(char::is_whitespace) => (*n).to_owned(),
            _ => "-".to_owned(),
        };
        let listener = match fds.take_tcp_listener(idx) {
            Ok(Some(l)) => Listener::Tcp(l),
            Ok(None) => continue,
            Err(_) => match fds.take_unix_listener(idx) {
                Ok(Some(l)) => Listener::Unix(l),
                Ok(None) => continue,
                Err(_) => {
                    ident.log(&format!(
                        "fd {fd} ({name}) is neither a TCP nor a unix stream socket, ignored"
                    ));
                    continue;
                }
            },
        };
        sockets.push(Socket {
            listener,
            body: ident.body(&name),
            name,
            owned: false,
        });
    }
    Ok(Some(sockets))
}

/// Binds and listens on `addr`, with `SO_REUSEPORT` set before bind if asked to.
fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// State shared by the main thread, the accept threads and the connection threads.
#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    counts: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Counts {
    /// Open connections.
    connections: usize,
    /// Running accept threads.
    acceptors: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn update(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Counts one open connection; dropping it (also when a thread fails to start) uncounts it.
#[derive(Debug)]
struct ConnGuard(Arc<Shared>);

impl ConnGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.lock().connections += 1;
        Self(Arc::clone(shared))
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.update(|c| c.connections -= 1);
    }
}

/// What to do after accept() failed.
enum AcceptError {
    /// Transient (lost race, aborted connection, signal): try again.
    Retry,
    /// Out of descriptors or memory: log, pause, try again.
    Backoff,
    /// The socket is unusable: give up on it.
    Fatal,
}

fn classify_accept_error(e: Errno) -> AcceptError {
    match e {
        Errno::EAGAIN
        | Errno::EINTR
        | Errno::ECONNABORTED
        | Errno::EPROTO
        | Errno::EPERM
        | Errno::ENETDOWN
        | Errno::ENOPROTOOPT
        | Errno::EHOSTDOWN
        | Errno::ENONET
        | Errno::EHOSTUNREACH
        | Errno::EOPNOTSUPP
        | Errno::ENETUNREACH
        | Errno::ETIMEDOUT => AcceptError::Retry,
        Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM => AcceptError::Backoff,
        _ => AcceptError::Fatal,
    }
}

/// No-op handler of the wake-up signal: its only effect is that a blocking accept4() in
/// the thread it is delivered to fails with EINTR.
extern "C" fn on_wake_signal(_: libc::c_int) {}

/// Installs the wake-up signal's handler, without `SA_RESTART` (with it, the kernel would
/// restart the interrupted accept4() instead of returning EINTR).
fn install_wake_handler() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_wake_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing at all, so it is trivially async-signal-safe, and
    // no other code in this process installs or relies on a handler for this signal.
    unsafe { nix::sys::signal::sigaction(WAKE_SIGNAL, &action) }.map(drop)
}

/// Accepts connections on one socket until the drain starts, one thread per connection.
///
/// Blocks in accept4() (a shared listener must stay blocking). The drain sets the flag and
/// then sends this thread the wake-up signal until it has returned, so accept4() fails
/// with EINTR and the loop sees the flag; a connection accept4() returned first is still
/// handed to its own thread (counted before this thread ends), so the drain serves it.
fn accept_loop(sock: &Socket, shared: &Arc<Shared>, ident: &Identity) {
    if let Err(e) = SigSet::from(WAKE_SIGNAL).thread_unblock() {
        // Without the signal the drain could not get this thread out of accept4().
        ident.log(&format!("cannot unblock {}: {e}", WAKE_SIGNAL.as_str()));
        process::exit(1);
    }
    let mut last_complaint: Option<Instant> = None;
    let mut complain = |msg: String| {
        if last_complaint.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_complaint = Some(Instant::now());
            ident.log(&msg);
        }
    };
    let mut fatal = false;
    while !shared.draining() {
        match sock.listener.accept() {
            Ok(conn) => spawn_connection(conn, sock, shared, &mut complain),
            Err(e) => match classify_accept_error(e) {
                AcceptError::Retry => {}
                AcceptError::Backoff => {
                    complain(format!("accept on {} failed: {e}; backing off", sock.name));
                    thread::sleep(ACCEPT_BACKOFF);
                }
                AcceptError::Fatal => {
                    ident.log(&format!("accept on {} failed: {e}; giving up", sock.name));
                    fatal = true;
                    break;
                }
            },
        }
    }
    if sock.owned && !fatal {
        // This socket is ours alone: connections still queued on it would be reset when it
        // is closed, so take and serve them now (non-blocking, so this ends when the
        // queue is empty).
        match sock.listener.set_nonblocking() {
            Ok(()) => loop {
                match sock.listener.accept() {
                    Ok(conn) => spawn_connection(conn, sock, shared, &mut complain),
                    Err(Errno::EINTR | Errno::ECONNABORTED) => {}
                    Err(_) => break,
                }
            },
            Err(e) => ident.log(&format!("cannot make {} non-blocking: {e}", sock.name)),
        }
    }
    // Dropping the socket afterwards closes this process's descriptor and nothing else.
    let mut last = false;
    shared.update(|c| {
        c.acceptors -= 1;
        last = c.acceptors == 0;
    });
    if fatal && last && !shared.draining() {
        ident.log("no usable listening socket left, exiting");
        process::exit(1);
    }
}

fn spawn_connection(
    conn: Conn,
    sock: &Socket,
    shared: &Arc<Shared>,
    complain: &mut impl FnMut(String),
) {
    let guard = ConnGuard::new(shared);
    let body = Arc::clone(&sock.body);
    let shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("conn".to_owned())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _guard = guard;
            // Inherited unblocked from the accept thread; only accept threads take it.
            let _ = SigSet::from(WAKE_SIGNAL).thread_block();
            serve_connection(conn, &body, &shared);
        });
    if let Err(e) = spawned {
        // The closure, and with it the connection and the guard, is dropped here.
        complain(format!("cannot start a connection thread: {e}"));
    }
}

/// A parsed request head, reduced to what the worker needs.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    /// Bytes of the head in the buffer, including leading empty lines and the final CRLF.
    head_len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor: u8,
    keep_alive: bool,
    head_only: bool,
    content_length: u64,
    expect_continue: bool,
    route: Route,
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Info,
    Health,
    Sleep(Duration),
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    Complete(Request),
    Partial,
    Bad(&'static str),
}

const BAD_REQUEST: &str = "400 Bad Request";
const VERSION_NOT_SUPPORTED: &str = "505 HTTP Version Not Supported";
const NOT_IMPLEMENTED: &str = "501 Not Implemented";

/// Parses the request head at the start of `data`.
fn parse_head(data: &[u8]) -> Head {
    let mut start = 0;
    while data[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let rest = &data[start..];
    let Some(end) = find(rest, b"\r\n\r\n") else {
        // Reject a garbage request line as soon as it is complete.
        if let Some(eol) = rest.iter().position(|&b| b == b'\n')
            && parse_request_line(strip_cr(&rest[..eol])).is_err()
        {
            return Head::Bad(BAD_REQUEST);
        }
        return Head::Partial;
    };
    let head = &rest[..end];
    let mut lines = head.split(|&b| b == b'\n').map(strip_cr);
    let Some(first) = lines.next() else {
        return Head::Bad(BAD_REQUEST);
    };
    let (method, target, minor) = match parse_request_line(first) {
        Ok(parts) => parts,
        Err(status) => return Head::Bad(status),
    };

    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Head::Bad(BAD_REQUEST);
        };
        let name = &line[..colon];
        let value = trim_ows(&line[colon + 1..]);
        if name.is_empty()
            || !name.iter().copied().all(is_tchar)
            || value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            // Also rejects obsolete line folding (a line starting with whitespace).
            return Head::Bad(BAD_REQUEST);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(len) = parse_decimal(value) else {
                return Head::Bad(BAD_REQUEST);
            };
            if content_length.is_some_and(|l| l != len) {
                return Head::Bad(BAD_REQUEST);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Head::Bad(NOT_IMPLEMENTED);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
    }

    Head::Complete(Request {
        head_len: start + end + 4,
        minor,
        keep_alive: !close && (minor == 1 || keep_alive),
        head_only: method == b"HEAD",
        content_length: content_length.unwrap_or(0),
        expect_continue: expect_continue && minor == 1,
        route: route(target),
    })
}

/// Splits `METHOD SP target SP HTTP/1.x`.
fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], u8), &'static str> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD_REQUEST);
    };
    if method.is_empty() || method.len() > 32 || !method.iter().copied().all(is_tchar) {
        return Err(BAD_REQUEST);
    }
    if target.is_empty() || target.iter().any(|&b| b <= 0x20 || b == 0x7f) {
        return Err(BAD_REQUEST);
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(VERSION_NOT_SUPPORTED);
        }
        _ => return Err(BAD_REQUEST),
    };
    Ok((method, target, minor))
}

fn route(target: &[u8]) -> Route {
    // Absolute form (`http://host/path`) becomes its path; query and fragment are dropped.
    let mut path = target;
    if let Some(scheme_end) = find(path, b"://") {
        let after = &path[scheme_end + 3..];
        path = after
            .iter()
            .position(|&b| b == b'/')
            .map_or(&b"/"[..], |slash| &after[slash..]);
    }
    if let Some(end) = path.iter().position(|&b| b == b'?' || b == b'#') {
        path = &path[..end];
    }
    if path == b"/health" {
        return Route::Health;
    }
    if let Some(ms) = path.strip_prefix(b"/sleep/")
        && !ms.is_empty()
        && ms.iter().all(u8::is_ascii_digit)
    {
        let ms = parse_decimal(ms).unwrap_or(MAX_SLEEP_MS).min(MAX_SLEEP_MS);
        return Route::Sleep(Duration::from_millis(ms));
    }
    Route::Info
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Outcome of waiting for more bytes from the client.
enum Input {
    Data(usize),
    /// Nothing arrived within `READ_TICK`.
    Tick,
    /// End of stream or an error: the connection is over.
    Closed,
}

fn read_some(conn: &mut Conn, buf: &mut [u8]) -> Input {
    loop {
        return match conn.read(buf) {
            Ok(0) => Input::Closed,
            Ok(n) => Input::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Input::Tick
            }
            Err(_) => Input::Closed,
        };
    }
}

/// Serves one connection until it closes, fails, idles out or the drain ends it.
fn serve_connection(mut conn: Conn, body: &[u8], shared: &Shared) {
    if conn.configure(READ_TICK, WRITE_TIMEOUT, true).is_err() {
        return;
    }
    let mut buf = vec![0_u8; MAX_HEAD];
    let mut out = Vec::with_capacity(256);
    let mut filled = 0;
    let mut idle_since = Instant::now();
    let mut head_started = Instant::now();
    loop {
        if filled > 0 {
            match parse_head(&buf[..filled]) {
                Head::Complete(req) => {
                    if !handle_request(
                        &mut conn,
                        &req,
                        &mut buf,
                        &mut filled,
                        &mut out,
                        body,
                        shared,
                    ) {
                        return;
                    }
                    idle_since = Instant::now();
                    head_started = idle_since;
                    continue;
                }
                Head::Bad(status) => {
                    respond_error(&mut conn, &mut out, status);
                    return;
                }
                Head::Partial if filled == buf.len() => {
                    respond_error(&mut conn, &mut out, "431 Request Header Fields Too Large");
                    return;
                }
                Head::Partial => {}
            }
        }
        match read_some(&mut conn, &mut buf[filled..]) {
            Input::Data(n) => {
                if filled == 0 {
                    head_started = Instant::now();
                }
                filled += n;
            }
            Input::Tick => {
                // An idle keep-alive connection is closed during the drain once a whole
                // read tick passed without a byte: closing right after the last response
                // would race with a client that is already sending its next request.
                let expired = if filled == 0 {
                    shared.draining() || idle_since.elapsed() >= KEEPALIVE_IDLE
                } else {
                    head_started.elapsed() >= REQUEST_TIMEOUT
                };
                if expired {
                    return;
                }
            }
            Input::Closed => return,
        }
    }
}

/// Reads the body of `req`, answers it and keeps any pipelined bytes that follow in `buf`.
/// Returns whether the connection stays open.
fn handle_request(
    conn: &mut Conn,
    req: &Request,
    buf: &mut [u8],
    filled: &mut usize,
    out: &mut Vec<u8>,
    body: &[u8],
    shared: &Shared,
) -> bool {
    if req.content_length > MAX_BODY {
        respond_error(conn, out, "413 Content Too Large");
        return false;
    }
    let buffered = *filled - req.head_len;
    match usize::try_from(req.content_length) {
        Ok(len) if len <= buffered => {
            let used = req.head_len + len;
            buf.copy_within(used..*filled, 0);
            *filled -= used;
        }
        _ => {
            *filled = 0;
            let remaining = req.content_length - buffered as u64;
            if req.expect_continue && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                return false;
            }
            if !discard_body(conn, buf, remaining) {
                return false;
            }
        }
    }

    let payload: &[u8] = match req.route {
        Route::Health => b"ok\n",
        Route::Info => body,
        Route::Sleep(pause) => {
            thread::sleep(pause);
            body
        }
    };
    // Checked after the work: a response finished during the drain closes the connection.
    let keep_alive = req.keep_alive && !shared.draining();
    let connection = match (keep_alive, req.minor) {
        (false, _) => "Connection: close\r\n",
        (true, 0) => "Connection: keep-alive\r\n",
        (true, _) => "",
    };
    build_response(out, "200 OK", connection, payload, req.head_only);
    if conn.write_all(out).is_err() {
        return false;
    }
    if !keep_alive {
        close_gracefully(conn);
    }
    keep_alive
}

/// Reads and drops `remaining` body bytes; false if the client stalls or goes away.
fn discard_body(conn: &mut Conn, buf: &mut [u8], mut remaining: u64) -> bool {
    let mut progress = Instant::now();
    while remaining > 0 {
        let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        match read_some(conn, &mut buf[..want]) {
            Input::Data(n) => {
                remaining -= n as u64;
                progress = Instant::now();
            }
            Input::Tick if progress.elapsed() < REQUEST_TIMEOUT => {}
            Input::Tick | Input::Closed => return false,
        }
    }
    true
}

fn build_response(out: &mut Vec<u8>, status: &str, connection: &str, payload: &[u8], head: bool) {
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n",
        payload.len()
    );
    if !head {
        out.extend_from_slice(payload);
    }
}

fn respond_error(conn: &mut Conn, out: &mut Vec<u8>, status: &str) {
    let mut payload = status.to_ascii_lowercase().into_bytes();
    payload.push(b'\n');
    build_response(out, status, "Connection: close\r\n", &payload, false);
    if conn.write_all(out).is_ok() {
        close_gracefully(conn);
    }
}

/// Ends the connection after a final response without resetting it: half-close, then
/// read (and drop) what the client still sends until it closes, for at most `LINGER`.
fn close_gracefully(conn: &mut Conn) {
    conn.shutdown_write();
    let deadline = Instant::now() + LINGER;
    let mut scratch = [0_u8; 4096];
    while Instant::now() < deadline {
        if let Input::Closed = read_some(conn, &mut scratch) {
            break;
        }
    }
}

fn stop_signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT] {
        set.add(sig);
    }
    set
}

fn wait_for_stop_signal(set: &SigSet, ident: &Identity) -> Signal {
    loop {
        match set.wait() {
            Ok(sig) => return sig,
            Err(e) => {
                ident.log(&format!("sigwait failed: {e}"));
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn start_watchdog(ident: &Identity) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    if interval.is_zero() {
        return;
    }
    let period = (interval / 2).max(Duration::from_millis(1));
    let ident_for_thread = ident.clone();
    let spawned = thread::Builder::new()
        .name("watchdog".to_owned())
        .spawn(move || {
            let mut complained = false;
            loop {
                if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog])
                    && !complained
                {
                    complained = true;
                    ident_for_thread.log(&format!("cannot send WATCHDOG=1: {e}"));
                }
                thread::sleep(period);
            }
        });
    if let Err(e) = spawned {
        ident.log(&format!("cannot start the watchdog thread: {e}"));
    }
}

/// Drains after a stop signal and exits; never returns.
///
/// Order matters: first every accept thread is made to leave accept4() and joined, so no
/// connection can be accepted any more and every accepted one is counted; only then the
/// open connections are waited for.
fn drain(
    signal: Signal,
    shared: &Shared,
    acceptors: Vec<JoinHandle<()>>,
    timeout: Duration,
    ident: &Identity,
) -> ! {
    let started = Instant::now();
    let deadline = started + timeout;
    shared.draining.store(true, Ordering::SeqCst);
    let open = shared.lock().connections;
    log(&format!(
        "worker {} pid {} generation {} draining on {} ({open} connection(s) open)",
        ident.worker,
        ident.pid,
        ident.generation,
        signal.as_str()
    ));
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);

    let stuck = stop_accepting(&acceptors, deadline);
    if stuck == 0 {
        for handle in acceptors {
            // A panicked accept thread has nothing left to hand over.
            let _ = handle.join();
        }
    } else {
        ident.log(&format!(
            "{stuck} accept thread(s) did not stop before the drain timeout"
        ));
    }

    let mut counts = shared.lock();
    while counts.connections > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        counts = shared
            .changed
            .wait_timeout(counts, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    let outcome = if counts.connections == 0 {
        "all connections finished".to_owned()
    } else {
        format!(
            "drain timeout, abandoning {} connection(s)",
            counts.connections
        )
    };
    log(&format!(
        "worker {} pid {} generation {} exiting after {:.3} s: {outcome}",
        ident.worker,
        ident.pid,
        ident.generation,
        started.elapsed().as_secs_f64()
    ));
    process::exit(0);
}

/// Sends the wake-up signal to every accept thread still running, every `WAKE_EVERY`,
/// until all have returned or `deadline` passed; returns how many are still running.
///
/// Repeating closes the lost-wakeup race: a thread that read the drain flag just before it
/// was set and was signalled before it entered accept4() blocks there, and is interrupted
/// by the next signal. In between, the threads are checked every `WAKE_CHECK`, so the
/// usual case (every thread out at the first signal) costs about a millisecond.
fn stop_accepting(acceptors: &[JoinHandle<()>], deadline: Instant) -> usize {
    let mut next_signal = Instant::now();
    loop {
        let now = Instant::now();
        let signal = now >= next_signal;
        if signal {
            next_signal = now + WAKE_EVERY;
        }
        let mut running = 0;
        for handle in acceptors.iter().filter(|h| !h.is_finished()) {
            running += 1;
            if !signal {
                continue;
            }
            // SAFETY: the handle is neither joined nor detached, so its pthread_t is still
            // valid (a thread that has just returned stays a valid, joinable target).
            // The signal's handler was installed before any accept thread started.
            let rc =
                unsafe { libc::pthread_kill(handle.as_pthread_t(), WAKE_SIGNAL as libc::c_int) };
            debug_assert!(rc == 0 || rc == libc::ESRCH, "pthread_kill: {rc}");
        }
        if running == 0 || now >= deadline {
            return running;
        }
        thread::sleep(WAKE_CHECK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(data: &[u8]) -> Request {
        match parse_head(data) {
            Head::Complete(req) => req,
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn parses_keep_alive_rules() {
        assert!(complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn parses_routes_and_lengths() {
        let req = complete(b"\r\nPOST /sleep/25?x=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(req.route, Route::Sleep(Duration::from_millis(25)));
        assert_eq!(req.content_length, 5);
        assert_eq!(req.head_len, 52);
        assert_eq!(
            complete(b"GET /sleep/99999999999999999999999 HTTP/1.1\r\n\r\n").route,
            Route::Sleep(Duration::from_millis(MAX_SLEEP_MS))
        );
        assert_eq!(
            complete(b"GET /health HTTP/1.1\r\n\r\n").route,
            Route::Health
        );
        assert_eq!(
            complete(b"GET http://h/health HTTP/1.1\r\n\r\n").route,
            Route::Health
        );
        assert_eq!(
            complete(b"GET /sleep/x HTTP/1.1\r\n\r\n").route,
            Route::Info
        );
        assert!(complete(b"HEAD / HTTP/1.1\r\n\r\n").head_only);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Head::Partial);
        assert_eq!(parse_head(b"hello world\r\n"), Head::Bad(BAD_REQUEST));
        assert_eq!(parse_head(b"\x16\x03\x01\x02\n"), Head::Bad(BAD_REQUEST));
        assert_eq!(
            parse_head(b"GET / HTTP/2.0\r\n\r\n"),
            Head::Bad(VERSION_NOT_SUPPORTED)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Head::Bad(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Head::Bad(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\n folded\r\n\r\n"),
            Head::Bad(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Head::Bad(NOT_IMPLEMENTED)
        );
    }

    #[test]
    fn parses_options() {
        let args = ["--bind", "127.0.0.1:1", "--bind=[::1]:2", "--reuse-port"];
        let opts = Options::parse(args.iter().map(OsString::from))
            .unwrap()
            .unwrap();
        assert_eq!(opts.binds.len(), 2);
        assert!(opts.reuse_port);
        assert!(Options::parse([OsString::from("--bogus")]).is_err());
        assert!(Options::parse([OsString::from("--bind")]).is_err());
    }
}
