//! The listening sockets: taken from systemd (`LISTEN_FDS`/`LISTEN_FDNAMES`, validated
//! strictly) or bound by clusterctl itself from `--listen`. Both paths end with the sockets
//! at fds 3..3+n of the supervisor, so spawning workers is one code path.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage, UnixAddr,
    bind, getsockname, listen, setsockopt, socket, sockopt,
};

use crate::config::{Address, ListenSpec};
use crate::error::{Context, Error, Result};
use crate::sys;

/// The supervisor's listening sockets, at fds 3..3+len.
#[derive(Debug, Default)]
pub struct Listeners {
    /// `LISTEN_FDNAMES` entries, one per socket.
    pub names: Vec<String>,
    /// Human-readable local addresses, for logs and status.
    pub addresses: Vec<String>,
    /// Unix socket files we created and remove on exit.
    created_paths: Vec<PathBuf>,
}

impl Listeners {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Unix socket files we created (handed over by `clusterctl upgrade`).
    pub fn created_paths(&self) -> &[PathBuf] {
        &self.created_paths
    }

    /// The sockets of the previous image (`clusterctl upgrade`), still at fds 3..3+n.
    pub fn adopt(
        names: Vec<String>,
        addresses: Vec<String>,
        created_paths: Vec<PathBuf>,
    ) -> Listeners {
        Listeners {
            names,
            addresses,
            created_paths,
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for p in &self.created_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What `LISTEN_*` says, parsed (pure; see `parse_listen_env`).
#[derive(Debug, PartialEq, Eq)]
pub struct Inherited {
    pub count: usize,
    pub names: Vec<String>,
}

/// The most sockets one supervisor takes (systemd's own limit per socket unit is far lower).
const MAX_SOCKETS: usize = 256;

/// Parses the socket-activation variables the way `sd_listen_fds_with_names(3)` does, but
/// strictly: anything malformed is an error instead of being silently ignored.
/// Returns `None` when the sockets are not meant for `my_pid` or there are none.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Option<Inherited>, String> {
    let Some(fds) = listen_fds else {
        return Ok(None);
    };
    let Some(pid) = listen_pid else {
        return Err("LISTEN_FDS is set but LISTEN_PID is not".into());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_PID={pid:?} is not a process id"))?;
    if pid != my_pid {
        return Ok(None);
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    if count == 0 {
        return Ok(None);
    }
    if count > MAX_SOCKETS {
        return Err(format!(
            "LISTEN_FDS={count} is more than {MAX_SOCKETS} sockets"
        ));
    }
    let names = match listen_fdnames {
        None => vec!["unknown".to_string(); count],
        Some(s) => {
            let names: Vec<String> = s.split(':').map(str::to_string).collect();
            if names.len() != count {
                return Err(format!(
                    "LISTEN_FDNAMES={s:?} has {} names but LISTEN_FDS={count}",
                    names.len()
                ));
            }
            for n in &names {
                crate::config::validate_fd_name(n)
                    .map_err(|e| format!("LISTEN_FDNAMES={s:?}: {e}"))?;
            }
            names
        }
    };
    Ok(Some(Inherited { count, names }))
}

/// Takes the sockets systemd passed, or binds `specs`. Call before anything else opens fds.
pub fn acquire(specs: &[ListenSpec], reuse_port: bool) -> Result<(Listeners, Vec<String>)> {
    let env = |k: &str| std::env::var(k).ok();
    let parsed = parse_listen_env(
        env("LISTEN_PID").as_deref(),
        env("LISTEN_FDS").as_deref(),
        env("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )
    .map_err(|e| Error::config(format!("invalid socket activation environment: {e}")))?;
    let mut warnings = Vec::new();
    if let Some(inh) = parsed {
        let fds = take_inherited(inh.count)?;
        check_inherited_open(&fds).map_err(Error::Config)?;
        sys::adopt_inherited(inh.count)
            .map_err(|e| Error::config(format!("socket activation: {e}")))?;
        if !specs.is_empty() {
            warnings.push(format!(
                "ignoring --listen: {} socket(s) were passed in by the service manager",
                inh.count
            ));
        }
        let addresses = (0..inh.count).map(local_address).collect();
        return Ok((
            Listeners {
                names: inh.names,
                addresses,
                created_paths: Vec::new(),
            },
            warnings,
        ));
    }
    if specs.is_empty() {
        return Err(Error::config(
            "no sockets: pass --listen ADDRESS (e.g. --listen 127.0.0.1:8080), \
             or start clusterctl through a systemd socket unit",
        ));
    }
    crate::config::check_listen_unique(specs).map_err(Error::Config)?;
    warnings.extend(specs.iter().filter_map(ListenSpec::every_interface_warning));
    let mut fds = Vec::with_capacity(specs.len());
    let mut listeners = Listeners::default();
    for (i, spec) in specs.iter().enumerate() {
        let (fd, created) = bind_one(spec, reuse_port)?;
        if let Some(p) = created {
            listeners.created_paths.push(p);
        }
        fds.push(fd);
        let default = format!("listen{i}");
        listeners.names.push(spec.name_or(&default).to_string());
    }
    sys::place_at_3(fds).context(|| "cannot place listening sockets at fds 3..".into())?;
    listeners.addresses = (0..specs.len()).map(local_address).collect();
    Ok((listeners, warnings))
}

/// Takes the `n` inherited sockets through listenfd, after `parse_listen_env` checked the
/// variables strictly. listenfd checks `LISTEN_PID` once more and removes `LISTEN_PID` and
/// `LISTEN_FDS` from our environment (this runs before any thread exists; workers get
/// LISTEN_* of their own from the supervisor). Only the raw fds are taken: listenfd's
/// typed `take_*_listener` would set FD_CLOEXEC and change nothing else we need. The
/// sockets stay at fds 3..3+n, where workers get them.
fn take_inherited(n: usize) -> Result<Vec<RawFd>> {
    let mut lfd = listenfd::ListenFd::from_env();
    if lfd.len() != n {
        return Err(Error::config(format!(
            "invalid socket activation environment: LISTEN_FDS={n}, but listenfd sees {} \
             sockets for this process (is LISTEN_PID this process's pid?)",
            lfd.len()
        )));
    }
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        let fd =
            lfd.take_raw_fd(i).ok().flatten().ok_or_else(|| {
                Error::config(format!("socket activation: listenfd has no fd {i}"))
            })?;
        if usize::try_from(fd).ok() != Some(3 + i) {
            return Err(Error::config(format!(
                "invalid socket activation environment: socket {i} is fd {fd}, not {} \
                 (LISTEN_FDS_FIRST_FD is not supported: pass the sockets from fd 3 on, as \
                 systemd does)",
                3 + i
            )));
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// Each inherited fd must be open before it is adopted; a missing one is named (instead
/// of a bare "Bad file descriptor").
fn check_inherited_open(fds: &[RawFd]) -> Result<(), String> {
    let n = fds.len();
    for fd in fds {
        if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err()
            && std::path::Path::new("/proc/self/fd").is_dir()
        {
            return Err(format!(
                "invalid socket activation environment: LISTEN_FDS={n} promises fds 3..{}, \
                 but fd {fd} is not open (whatever started clusterctl closed it or passed \
                 fewer sockets)",
                2 + n
            ));
        }
    }
    Ok(())
}

/// The local address of listening socket `i`, for humans.
fn local_address(i: usize) -> String {
    match getsockname::<SockaddrStorage>(sys::listen_fd(i).as_raw_fd()) {
        Ok(a) => {
            if let Some(u) = a.as_unix_addr() {
                match u.path() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(abstract)".to_string(),
                }
            } else {
                a.to_string()
            }
        }
        Err(e) => format!("(unknown: {e})"),
    }
}

/// `listen()` backlog, the same as the generated socket unit's `Backlog=` (the kernel caps
/// it at net.core.somaxconn); a server that calls `listen()` again sets its own.
const BACKLOG: i32 = 4096;

fn bind_one(spec: &ListenSpec, reuse_port: bool) -> Result<(OwnedFd, Option<PathBuf>)> {
    let flags = SockFlag::SOCK_CLOEXEC;
    let what = || format!("cannot listen on {}", spec.address);
    match &spec.address {
        Address::Tcp(addr) => {
            let family = if addr.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, flags, None).context(what)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true).context(what)?;
            if reuse_port {
                setsockopt(&fd, sockopt::ReusePort, &true).context(what)?;
            }
            let res = match addr {
                std::net::SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(*a)),
                std::net::SocketAddr::V6(a) => {
                    // A bare port means every address, IPv4 included, like ListenStream=PORT.
                    setsockopt(&fd, sockopt::Ipv6V6Only, &!a.ip().is_unspecified())
                        .context(what)?;
                    bind(fd.as_raw_fd(), &SockaddrIn6::from(*a))
                }
            };
            res.map_err(|e| bind_error(spec, e, reuse_port))?;
            // As the socket unit's NoDelay=true: accepted connections inherit TCP_NODELAY,
            // so servers that do not set it themselves answer small requests at once.
            setsockopt(&fd, sockopt::TcpNoDelay, &true).context(what)?;
            listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN)).context(what)?;
            Ok((fd, None))
        }
        Address::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None).context(what)?;
            let addr = UnixAddr::new(path).context(what)?;
            bind(fd.as_raw_fd(), &addr).map_err(|e| bind_error(spec, e, false))?;
            listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN)).context(what)?;
            Ok((fd, Some(path.clone())))
        }
    }
}

fn bind_error(spec: &ListenSpec, e: nix::Error, reuse_port: bool) -> Error {
    let hint = match e {
        nix::Error::EADDRINUSE if !reuse_port => {
            " (another process is listening there; stop it, choose another port, or use \
             --reuse-port on both sides for a side-by-side upgrade)"
        }
        nix::Error::EADDRINUSE => " (another process is listening there without SO_REUSEPORT)",
        nix::Error::EACCES => " (ports below 1024 need privileges: use a systemd socket unit)",
        nix::Error::EADDRNOTAVAIL => " (that address is not configured on this machine)",
        _ => "",
    };
    Error::Io {
        context: format!("cannot listen on {}{hint}", spec.address),
        source: e.into(),
    }
}

/// A unix socket file left behind by a crashed process is removed; one that still accepts
/// connections (another server) or a non-socket file is an error.
fn remove_stale_unix_socket(path: &std::path::Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::config(format!(
            "cannot listen on unix:{}: the path exists and is not a socket",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::Io {
            context: format!(
                "cannot listen on unix:{} (another process is listening there)",
                path.display()
            ),
            source: std::io::ErrorKind::AddrInUse.into(),
        });
    }
    std::fs::remove_file(path).context(|| format!("cannot remove stale socket {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_tcp_socket_has_the_socket_units_options() {
        // Port 0 is refused on the command line; a test may bind it directly.
        let spec = ListenSpec {
            name: None,
            address: Address::Tcp("127.0.0.1:0".parse().unwrap()),
            raw: "127.0.0.1:0".into(),
        };
        let (fd, _) = bind_one(&spec, false).unwrap();
        assert!(nix::sys::socket::getsockopt(&fd, sockopt::TcpNoDelay).unwrap());
        // Accepted connections inherit TCP_NODELAY, as with the socket unit's NoDelay=true.
        let listener = std::net::TcpListener::from(fd);
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (conn, _) = listener.accept().unwrap();
        assert!(
            conn.nodelay().unwrap(),
            "accepted connection has TCP_NODELAY"
        );
        assert!(!client.nodelay().unwrap(), "the client side is untouched");
    }

    #[test]
    fn missing_inherited_fd_is_named() {
        // fds far above anything this test process has open.
        let err = check_inherited_open(&(3..4003).collect::<Vec<_>>()).unwrap_err();
        assert!(
            err.contains("LISTEN_FDS=4000") && err.contains("is not open"),
            "{err}"
        );
        assert!(err.contains("fd "), "{err}");
        assert!(check_inherited_open(&[]).is_ok());
    }

    #[test]
    fn listen_env_parsing() {
        let p = |pid, fds, names| parse_listen_env(pid, fds, names, 42);
        assert_eq!(p(None, None, None), Ok(None));
        assert_eq!(
            p(Some("41"), Some("2"), None),
            Ok(None),
            "for another process"
        );
        assert_eq!(p(Some("42"), Some("0"), None), Ok(None));
        assert_eq!(
            p(Some("42"), Some("2"), Some("web:admin")),
            Ok(Some(Inherited {
                count: 2,
                names: vec!["web".into(), "admin".into()]
            }))
        );
        assert_eq!(
            p(Some("42"), Some("1"), None),
            Ok(Some(Inherited {
                count: 1,
                names: vec!["unknown".into()]
            }))
        );
        for (pid, fds, names, msg) in [
            (None, Some("1"), None, "LISTEN_PID is not"),
            (Some("x"), Some("1"), None, "not a process id"),
            (Some("42"), Some("two"), None, "not a number"),
            (Some("42"), Some("-1"), None, "not a number"),
            (Some("42"), Some("2"), Some("web"), "has 1 names"),
            (Some("42"), Some("1"), Some("a b"), "contains"),
            (Some("42"), Some("1"), Some(""), "1 to 255"),
            (Some("42"), Some("100000"), None, "more than"),
        ] {
            let err = p(pid, fds, names).unwrap_err();
            assert!(err.contains(msg), "{err:?} should mention {msg:?}");
        }
    }
}
