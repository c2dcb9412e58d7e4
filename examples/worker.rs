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
//! Responses: `/health` answers `ok`, `/sleep/<ms>` sleeps (at most 60 s) and then answers
//! like every other path: `worker=<id> pid=<pid> generation=<gen> socket=<name>`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use std::{env, process, thread};

use listenfd::ListenFd;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, sockopt,
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
    // so the signals stay pending until the main thread collects them with sigwait.
    let stop_signals = stop_signal_set();
    if let Err(e) = stop_signals.thread_block() {
        ident.log(&format!("cannot block stop signals: {e}"));
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
    let (wake_tx, wake_rx) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            ident.log(&format!("cannot create the wake-up socket pair: {e}"));
            process::exit(1);
        }
    };
    let wake_rx = Arc::new(wake_rx);

    let count = sockets.len();
    for sock in sockets {
        shared.lock().acceptors += 1;
        if sock.owned {
            shared.lock().sweepers += 1;
        }
        let shared_for_thread = Arc::clone(&shared);
        let wake = Arc::clone(&wake_rx);
        let ident_for_thread = ident.clone();
        let spawned = thread::Builder::new()
            .name(format!("accept-{}", sock.name))
            .spawn(move || accept_loop(&sock, &wake, &shared_for_thread, &ident_for_thread));
        if let Err(e) = spawned {
            ident.log(&format!("cannot start an accept thread: {e}"));
            process::exit(1);
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
    drain(signal, &shared, &wake_tx, opts.drain_timeout, &ident);
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

/// Writes one line to stderr; never panics (unlike `eprintln!` on a broken pipe).
fn log(msg: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{msg}");
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
    /// Bound by this process (`--bind`): not shared, so it is non-blocking and the
    /// connections still queued on it are accepted and served before it is closed.
    owned: bool,
    body: Arc<[u8]>,
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Self::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            Self::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(l) => l.as_fd(),
            Self::Unix(l) => l.as_fd(),
        }
    }
}

/// An accepted connection.
#[derive(Debug)]
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn prepare(&self) -> io::Result<()> {
        // accept4() never hands out a non-blocking socket unless asked to, even when the
        // listener is non-blocking, so only the timeouts (and Nagle) need setting.
        match self {
            Self::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(READ_TICK))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Self::Unix(s) => {
                s.set_read_timeout(Some(READ_TICK))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Write),
            Self::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("cannot make {addr} non-blocking: {e}"))?;
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
    socket::bind(fd.as_raw_fd(), &sockaddr(addr)?)?;
    socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Converts a std socket address into nix's storage type (nix's own conversion needs its
/// `net` feature, which this crate does not enable).
fn sockaddr(addr: SocketAddr) -> io::Result<SockaddrStorage> {
    use nix::libc;
    use std::mem::size_of;

    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "unsupported address");
    let family = |af: libc::c_int| libc::sa_family_t::try_from(af).map_err(|_| invalid());
    let len = |size: usize| libc::socklen_t::try_from(size).map_err(|_| invalid());
    let storage = match addr {
        SocketAddr::V4(a) => {
            let raw = libc::sockaddr_in {
                sin_family: family(libc::AF_INET)?,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `raw` is a fully initialised sockaddr_in that outlives the call, and
            // the length passed is exactly its size; from_raw only copies those bytes.
            unsafe {
                SockaddrStorage::from_raw(
                    (&raw const raw).cast(),
                    Some(len(size_of::<libc::sockaddr_in>())?),
                )
            }
        }
        SocketAddr::V6(a) => {
            let raw = libc::sockaddr_in6 {
                sin6_family: family(libc::AF_INET6)?,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: `raw` is a fully initialised sockaddr_in6 that outlives the call, and
            // the length passed is exactly its size; from_raw only copies those bytes.
            unsafe {
                SockaddrStorage::from_raw(
                    (&raw const raw).cast(),
                    Some(len(size_of::<libc::sockaddr_in6>())?),
                )
            }
        }
    };
    storage.ok_or_else(invalid)
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
    /// Accept threads of sockets bound by this process that have not finished accepting
    /// their queued connections; the drain waits for them (they never block).
    sweepers: usize,
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

fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(
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
            | Errno::ETIMEDOUT,
        ) => AcceptError::Retry,
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => {
            AcceptError::Backoff
        }
        _ => AcceptError::Fatal,
    }
}

/// Accepts connections on one socket until the drain starts, one thread per connection.
///
/// Waits in poll() on the listener and the wake-up socket. A shared listener may be in
/// blocking mode and another worker may win the race for a connection, so accept() can
/// block; if the drain starts meanwhile, the one connection it then returns is still
/// served (with `Connection: close`) and the loop ends.
fn accept_loop(sock: &Socket, wake: &UnixStream, shared: &Arc<Shared>, ident: &Identity) {
    let mut last_complaint: Option<Instant> = None;
    let mut complain = |msg: String| {
        if last_complaint.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_complaint = Some(Instant::now());
            ident.log(&msg);
        }
    };
    let mut fatal = false;
    loop {
        let mut fds = [
            PollFd::new(sock.listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                complain(format!("poll on {} failed: {e}", sock.name));
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        }
        let listener_events = fds[0].revents().unwrap_or(PollFlags::empty());
        let woken = fds[1].any().unwrap_or(true);
        if woken || shared.draining() {
            break;
        }
        if listener_events.contains(PollFlags::POLLNVAL) {
            ident.log(&format!("listener {} is not an open socket", sock.name));
            fatal = true;
            break;
        }
        if listener_events.is_empty() {
            continue;
        }
        match sock.listener.accept() {
            Ok(conn) => {
                // Read the flag before handing the connection over: if the drain started
                // while accept() was blocked, this is the last connection taken.
                let draining = shared.draining();
                spawn_connection(conn, sock, shared, &mut complain);
                if draining {
                    break;
                }
            }
            Err(e) => match classify_accept_error(&e) {
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
        // This socket is ours alone (and non-blocking): connections still queued on it
        // would be reset when it is closed, so take and serve them now.
        while let Ok(conn) = sock.listener.accept() {
            spawn_connection(conn, sock, shared, &mut complain);
        }
    }
    // Dropping the socket afterwards closes this process's descriptor and nothing else.
    let mut last = false;
    shared.update(|c| {
        c.acceptors -= 1;
        if sock.owned {
            c.sweepers -= 1;
        }
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
    if conn.prepare().is_err() {
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
fn drain(
    signal: Signal,
    shared: &Shared,
    wake_tx: &UnixStream,
    timeout: Duration,
    ident: &Identity,
) -> ! {
    let started = Instant::now();
    shared.draining.store(true, Ordering::SeqCst);
    // Wakes every accept thread that sits in poll(); the byte is never read, so the
    // wake-up socket stays readable for all of them.
    if let Err(e) = (&*wake_tx).write_all(b"x") {
        ident.log(&format!("cannot wake the accept threads: {e}"));
    }
    let open = shared.lock().connections;
    log(&format!(
        "worker {} pid {} generation {} draining on {} ({open} connection(s) open)",
        ident.worker,
        ident.pid,
        ident.generation,
        signal.as_str()
    ));
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);

    let deadline = started + timeout;
    let mut counts = shared.lock();
    while counts.connections > 0 || counts.sweepers > 0 {
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
    // The lock stays held until exit, so no accept thread can hand out another connection.
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
