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

mod accept;
#[path = "../shared/conn.rs"]
mod conn;
mod http;
mod serve;
mod sockets;

use accept::{Shared, accept_loop, install_wake_handler};
use conn::Conn;
use http::{Head, Input, Request, Route, parse_head, read_some};
use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, sockopt,
};
use sd_notify::NotifyState;
use serve::serve_connection;
use sockets::{Socket, collect_sockets};

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
