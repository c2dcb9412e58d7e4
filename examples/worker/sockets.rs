//! The listening sockets: inherited through `LISTEN_FDS` (TCP or unix, named by
//! `LISTEN_FDNAMES`) or bound by the worker itself (`--bind`, `--reuse-port`).

use super::{
    AddressFamily, Arc, AsRawFd, Backlog, Conn, Errno, FromRawFd, Identity, ListenFd, Options,
    OwnedFd, RawFd, SockFlag, SockType, SockaddrIn, SockaddrIn6, SocketAddr, TcpListener,
    TcpStream, UnixListener, UnixStream, env, io, socket, sockopt,
};

/// A listening socket and what the worker knows about it.
#[derive(Debug)]
pub(crate) struct Socket {
    pub(crate) listener: Listener,
    /// Fd name from `LISTEN_FDNAMES`, or the `--bind` address.
    pub(crate) name: String,
    /// Bound by this process (`--bind`): not shared, so once accepting stops it is made
    /// non-blocking and the connections still queued on it are accepted and served before
    /// it is closed.
    pub(crate) owned: bool,
    pub(crate) body: Arc<[u8]>,
}

#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// One accept4() call, without std's automatic retry on EINTR: the wake-up signal must
    /// be able to get the thread out. Accepted sockets are blocking and close-on-exec.
    pub(crate) fn accept(&self) -> Result<Conn, Errno> {
        let raw = socket::accept4(self.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor, open and owned by nothing else;
        // the OwnedFd takes sole ownership of it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(match self {
            Self::Tcp(_) => Conn::Tcp(TcpStream::from(fd)),
            Self::Unix(_) => Conn::Unix(UnixStream::from(fd)),
        })
    }

    pub(crate) fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l) => l.as_raw_fd(),
        }
    }

    pub(crate) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.set_nonblocking(true),
            Self::Unix(l) => l.set_nonblocking(true),
        }
    }
}

/// Gathers the listening sockets: the inherited ones when socket-activated, else `--bind`.
pub(crate) fn collect_sockets(opts: &Options, ident: &Identity) -> Result<Vec<Socket>, String> {
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
pub(crate) fn inherited_sockets(ident: &Identity) -> Result<Option<Vec<Socket>>, String> {
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
pub(crate) fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
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
