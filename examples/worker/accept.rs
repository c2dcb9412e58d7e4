//! Accept threads: a blocking `accept4()` per socket, woken by the drain with a private
//! signal; every connection on its own small thread, counted so the drain can wait for it.

use super::{
    ACCEPT_BACKOFF, Arc, AtomicBool, CONN_STACK, Condvar, Conn, Duration, Errno, Identity, Instant,
    Mutex, MutexGuard, Ordering, PoisonError, SaFlags, SigAction, SigHandler, SigSet, Socket,
    WAKE_SIGNAL, libc, process, serve_connection, thread,
};

/// State shared by the main thread, the accept threads and the connection threads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) draining: AtomicBool,
    pub(crate) counts: Mutex<Counts>,
    pub(crate) changed: Condvar,
}

#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Open connections.
    pub(crate) connections: usize,
    /// Running accept threads.
    pub(crate) acceptors: usize,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Counts one open connection; dropping it (also when a thread fails to start) uncounts it.
#[derive(Debug)]
pub(crate) struct ConnGuard(Arc<Shared>);

impl ConnGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
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
pub(crate) enum AcceptError {
    /// Transient (lost race, aborted connection, signal): try again.
    Retry,
    /// Out of descriptors or memory: log, pause, try again.
    Backoff,
    /// The socket is unusable: give up on it.
    Fatal,
}

pub(crate) fn classify_accept_error(e: Errno) -> AcceptError {
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
pub(crate) fn install_wake_handler() -> nix::Result<()> {
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
pub(crate) fn accept_loop(sock: &Socket, shared: &Arc<Shared>, ident: &Identity) {
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

pub(crate) fn spawn_connection(
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
