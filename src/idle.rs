//! Is anybody using our sockets? Answered from what the kernel knows, without the workers'
//! cooperation, for `--exit-idle-after` and `--lazy`.
//!
//! TCP: one `NETLINK_SOCK_DIAG` dump of the TCP sockets per family (`inet_diag_req_v2`,
//! states LISTEN + every connected state). For our listening sockets (matched by inode)
//! `idiag_rqueue` is the accept queue; any connected socket whose local port is one of our
//! listening ports is an open connection. sock_diag was chosen over parsing
//! `/proc/net/tcp{,6}` because the kernel filters by state for us and the answer is binary
//! and exact; over eBPF or conntrack because it needs no privileges and no extra setup.
//!
//! Unix sockets: `/proc/net/unix` lists every socket with its path; an accepted connection
//! carries the listener's path, and the listener's own line does not show its queue, so a
//! pending connection is seen as soon as a worker accepted it (or through `POLLIN` on the
//! listening socket while no worker runs, see the executor).
//!
//! Short connections that open and close between two samples are still seen: every
//! connection socket has a kernel cookie that it keeps into TIME_WAIT (the server side of
//! a connection the server closed stays there for 60 s), so a cookie not seen in the
//! previous sample is new activity. Blind spot: a connection the *client* closed first
//! leaves no TIME_WAIT on our side, so if it also opened and closed between two samples
//! (a tenth of the idle timeout apart) it is missed.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

/// What one sample found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Connections waiting in our listening sockets' accept queues.
    pub queued: u32,
    /// Connections open on our listening ports (accepted by a worker, or not yet).
    pub open: u32,
    /// Connections (in any state, TIME_WAIT included) not seen in the previous sample.
    pub new: u32,
}

impl Usage {
    pub fn busy(self) -> bool {
        self.queued > 0 || self.open > 0 || self.new > 0
    }
}

/// The listening sockets to watch, described once at start.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// (family, local port, socket inode) of TCP listeners.
    pub tcp: Vec<(AddressFamily, u16, u64)>,
    /// Paths of unix listeners.
    pub unix: Vec<String>,
    /// Cookies of the connection sockets seen in the last sample.
    pub seen: std::collections::HashSet<u64>,
}

impl Watched {
    /// Describes listening sockets 0..n (fds 3..3+n).
    pub fn from_listeners(n: usize) -> Watched {
        use nix::sys::socket::{SockaddrLike, SockaddrStorage, getsockname};
        let mut w = Watched::default();
        for i in 0..n {
            let fd = crate::sys::listen_fd(i);
            let Ok(addr) = getsockname::<SockaddrStorage>(fd.as_raw_fd()) else {
                continue;
            };
            let ino = nix::sys::stat::fstat(fd).map_or(0, |s| s.st_ino);
            if let Some(a) = addr.as_sockaddr_in() {
                w.tcp.push((AddressFamily::Inet, a.port(), ino));
            } else if let Some(a) = addr.as_sockaddr_in6() {
                w.tcp.push((AddressFamily::Inet6, a.port(), ino));
            } else if let Some(p) = addr.as_unix_addr().and_then(|u| u.path()) {
                w.unix.push(p.display().to_string());
            }
            let _ = addr.family();
        }
        w
    }

    /// Takes one sample. Errors (no netlink in a sandbox, say) count as "busy" so that a
    /// blind supervisor never exits under load; the first one is logged.
    pub fn sample(&mut self) -> Usage {
        let (usage, error) = self.try_sample();
        if let Some(e) = error {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "cannot see the sockets' connections ({e}); --exit-idle-after will treat \
                     the service as busy (under systemd, allow AF_NETLINK in \
                     RestrictAddressFamilies=)"
                );
            });
        }
        usage
    }

    /// The TCP connections waiting in our listeners' accept queues (by cookie), and
    /// whether any connection a worker accepted is open. A connection the kernel
    /// completed but nobody accepted yet has no socket inode (`idiag_inode` 0) and is in
    /// ESTABLISHED or CLOSE_WAIT; once accepted it has one.
    pub fn accept_queue(&self) -> std::io::Result<(std::collections::HashSet<u64>, bool)> {
        let mut waiting = std::collections::HashSet::new();
        let mut accepting = false;
        if self.tcp.is_empty() {
            return Err(std::io::Error::other("no TCP listener"));
        }
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            for s in tcp_dump(fam, LIVE_STATES)? {
                let (w, a) = queued_or_accepted(&s, &self.tcp);
                if w {
                    waiting.insert(s.cookie);
                }
                accepting |= a;
            }
        }
        Ok((waiting, accepting))
    }

    fn try_sample(&mut self) -> (Usage, Option<String>) {
        let mut error = None;
        let mut u = Usage::default();
        let families: Vec<AddressFamily> = {
            let mut f: Vec<AddressFamily> = self.tcp.iter().map(|t| t.0).collect();
            f.dedup();
            // A dual-stack [::] listener receives IPv4 connections as IPv6 sockets, but
            // look at both families anyway.
            if !f.is_empty() {
                f = vec![AddressFamily::Inet, AddressFamily::Inet6];
            }
            f
        };
        let mut seen = std::collections::HashSet::new();
        for fam in families {
            match tcp_dump(fam, ALL_STATES) {
                Ok(socks) => {
                    let t = tally(&socks, &self.tcp, &self.seen, &mut seen);
                    u.queued += t.queued;
                    u.open += t.open;
                    u.new += t.new;
                }
                Err(e) => {
                    u.open += 1;
                    error = Some(format!("sock_diag: {e}"));
                }
            }
        }
        if !self.unix.is_empty() {
            // /proc/self/net, not /proc/net: visible under ProcSubset=pid too.
            match std::fs::read_to_string("/proc/self/net/unix") {
                Ok(text) => u.open += unix_connections(&text, &self.unix),
                Err(e) => {
                    u.open += 1;
                    error = Some(format!("/proc/self/net/unix: {e}"));
                }
            }
        }
        self.seen = seen;
        (u, error)
    }
}

/// One socket from a sock_diag dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSock {
    pub state: u8,
    pub local_port: u16,
    pub rqueue: u32,
    pub inode: u64,
    pub cookie: u64,
}

const TCP_ESTABLISHED: u8 = 1;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;

/// Counts queued, open and new connections for the watched listeners in a dump; `seen`
/// holds the cookies of the previous sample, `now` collects this sample's.
fn tally(
    socks: &[DiagSock],
    watched: &[(AddressFamily, u16, u64)],
    seen: &std::collections::HashSet<u64>,
    now: &mut std::collections::HashSet<u64>,
) -> Usage {
    let mut u = Usage::default();
    for s in socks {
        if s.state == TCP_LISTEN {
            if watched.iter().any(|w| w.2 == s.inode && s.inode != 0) {
                u.queued += s.rqueue;
            }
        } else if watched.iter().any(|w| w.1 == s.local_port) {
            if s.state != TCP_TIME_WAIT {
                u.open += 1;
            }
            if !seen.contains(&s.cookie) {
                u.new += 1;
            }
            now.insert(s.cookie);
        }
    }
    u
}

/// Is this socket a connection to one of our listeners still in the accept queue, or
/// one a worker accepted (and holds open)?
fn queued_or_accepted(s: &DiagSock, watched: &[(AddressFamily, u16, u64)]) -> (bool, bool) {
    let ours = s.state != TCP_LISTEN && watched.iter().any(|w| w.1 == s.local_port);
    if !ours || !matches!(s.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT) {
        return (false, false);
    }
    (s.inode == 0, s.inode != 0)
}

/// Every TCP state but CLOSE (7). TIME_WAIT (6) shows connections that already ended
/// (the idle sampler counts them as traffic since its last look).
const ALL_STATES: u32 = 0b1111_1111_1110 & !(1 << TCP_CLOSE);

/// The states `queued_or_accepted` looks at. After a load a host holds tens of thousands
/// of TIME_WAIT sockets (34k here after a full test run); asking the kernel for these two
/// states only keeps the accept-queue probe cheap.
const LIVE_STATES: u32 = (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT);

/// The request: `nlmsghdr` + `inet_diag_req_v2` asking for the TCP sockets of `family`
/// in `states` (a bit per state).
fn tcp_request(family: AddressFamily, states: u32) -> Vec<u8> {
    let mut req = Vec::with_capacity(72);
    let len: u32 = 16 + 56;
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (48 bytes).
    req.push(u8::try_from(family as i32).unwrap_or(0));
    req.push(6); // IPPROTO_TCP
    req.push(0);
    req.push(0);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]);
    req
}

/// Parses the `inet_diag_msg` records of a sock_diag answer. Returns the sockets and
/// whether the dump is complete (`NLMSG_DONE` seen).
pub fn parse_dump(buf: &[u8], out: &mut Vec<DiagSock>) -> Result<bool, String> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < 16 || off + len > buf.len() {
            return Err("truncated netlink message".into());
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = buf
                    .get(off + 16..off + 20)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                return Err(format!("netlink error {errno}"));
            }
            SOCK_DIAG_BY_FAMILY => {
                let m = &buf[off + 16..off + len];
                // inet_diag_msg: family, state, timer, retrans, id (48: sport be16 at 0),
                // expires u32, rqueue u32, wqueue u32, uid u32, inode u32.
                if m.len() < 72 {
                    return Err("short inet_diag_msg".into());
                }
                out.push(DiagSock {
                    state: m[1],
                    local_port: u16::from_be_bytes([m[4], m[5]]),
                    rqueue: u32::from_ne_bytes(m[56..60].try_into().unwrap()),
                    inode: u64::from(u32::from_ne_bytes(m[68..72].try_into().unwrap())),
                    cookie: u64::from_ne_bytes(m[44..52].try_into().unwrap()),
                });
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

fn tcp_dump(family: AddressFamily, states: u32) -> std::io::Result<Vec<DiagSock>> {
    // Non-blocking: the event loop never waits here. The kernel builds each part of a
    // dump while handling the request (`send`) or the previous `recv`, so the answer is
    // always there already; if it is not, the sample fails instead of stalling.
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkSockDiag,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    send(
        fd.as_raw_fd(),
        &tcp_request(family, states),
        MsgFlags::empty(),
    )?;
    let mut socks = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // MSG_TRUNC: the real length, so a message larger than the buffer is an error
        // instead of silently cut (which could lose NLMSG_DONE).
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
            Err(nix::Error::EAGAIN) => {
                return Err(std::io::Error::other(
                    "sock_diag answer not ready (not waiting for it)",
                ));
            }
            r => r?,
        };
        if n == 0 {
            break;
        }
        if n > buf.len() {
            return Err(std::io::Error::other("sock_diag answer larger than 64 KiB"));
        }
        match parse_dump(&buf[..n], &mut socks) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    Ok(socks)
}

/// Connected sockets in `/proc/net/unix` bound to one of `paths` (accepted connections
/// carry their listener's path; state 03 is SS_CONNECTED).
pub fn unix_connections(proc_net_unix: &str, paths: &[String]) -> u32 {
    let mut n = 0;
    for line in proc_net_unix.lines().skip(1) {
        // Num RefCount Protocol Flags Type St Inode Path
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 && f[5] == "03" && paths.iter().any(|p| p == f[7]) {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn msg(state: u8, sport: u16, rqueue: u32, inode: u32) -> Vec<u8> {
        let mut m = vec![0u8; 72];
        m[0] = 2;
        m[1] = state;
        m[4..6].copy_from_slice(&sport.to_be_bytes());
        // The cookie: distinct per socket (the inode will do in these tests).
        m[44..52].copy_from_slice(&u64::from(inode).to_ne_bytes());
        m[56..60].copy_from_slice(&rqueue.to_ne_bytes());
        m[68..72].copy_from_slice(&inode.to_ne_bytes());
        let mut out = Vec::new();
        out.extend_from_slice(&(16 + 72u32).to_ne_bytes());
        out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out.extend_from_slice(&[0u8; 10]);
        out.extend_from_slice(&m);
        out
    }

    #[test]
    fn state_masks() {
        let all = (1..=11u32).filter(|s| *s != 7).fold(0, |m, s| m | (1 << s));
        assert_eq!(ALL_STATES, all);
        assert_eq!(ALL_STATES & (1 << TCP_TIME_WAIT), 1 << TCP_TIME_WAIT);
        assert_eq!(LIVE_STATES & ALL_STATES, LIVE_STATES);
        assert_eq!(LIVE_STATES & (1 << TCP_TIME_WAIT), 0);
    }

    #[test]
    fn parses_a_dump_and_tallies_our_sockets() {
        let mut buf = msg(TCP_LISTEN, 8080, 3, 77);
        buf.extend(msg(1, 8080, 0, 90)); // established on our port
        buf.extend(msg(1, 22, 0, 91)); // somebody else's
        buf.extend(msg(TCP_LISTEN, 9090, 5, 78)); // a listener that is not ours
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0u8; 14]);
        buf.extend(done);
        let mut socks = Vec::new();
        assert_eq!(parse_dump(&buf, &mut socks), Ok(true));
        assert_eq!(socks.len(), 4);
        let ours = [(AddressFamily::Inet, 8080, 77)];
        let (mut before, mut now) = (HashSet::new(), HashSet::new());
        let u = tally(&socks, &ours, &before, &mut now);
        assert_eq!(
            u,
            Usage {
                queued: 3,
                open: 1,
                new: 1
            }
        );
        assert!(u.busy());
        assert!(!tally(&socks[2..3], &ours, &before, &mut HashSet::new()).busy());
        // The same connection in the next sample is open, but not new.
        before = std::mem::take(&mut now);
        let u = tally(&socks[1..2], &ours, &before, &mut now);
        assert_eq!(
            u,
            Usage {
                queued: 0,
                open: 1,
                new: 0
            }
        );
    }

    #[test]
    fn a_connection_that_ended_between_samples_is_still_activity() {
        let ours = [(AddressFamily::Inet, 8080, 77)];
        let mut buf = msg(TCP_TIME_WAIT, 8080, 0, 0);
        buf[16 + 44..16 + 52].copy_from_slice(&4242u64.to_ne_bytes());
        let mut socks = Vec::new();
        parse_dump(&buf, &mut socks).unwrap();
        let mut now = HashSet::new();
        let u = tally(&socks, &ours, &HashSet::new(), &mut now);
        assert_eq!(
            u,
            Usage {
                queued: 0,
                open: 0,
                new: 1
            },
            "TIME_WAIT is not open, but new"
        );
        let u = tally(&socks, &ours, &now, &mut HashSet::new());
        assert!(!u.busy(), "seen before: idle");
    }

    #[test]
    fn rejects_truncated_answers() {
        let buf = msg(1, 80, 0, 1);
        assert!(parse_dump(&buf[..40], &mut Vec::new()).is_err());
    }

    #[test]
    fn unix_connections_by_path() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000: 00000002 00000000 00010000 0001 01 100 /run/app.sock\n\
            0000: 00000003 00000000 00000000 0001 03 101 /run/app.sock\n\
            0000: 00000003 00000000 00000000 0001 03 102 /run/other.sock\n\
            0000: 00000003 00000000 00000000 0001 03 103\n";
        assert_eq!(unix_connections(text, &["/run/app.sock".into()]), 1);
    }

    #[test]
    fn a_connection_nobody_accepted_is_told_from_an_accepted_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ino = nix::sys::stat::fstat(&listener).unwrap().st_ino;
        let watched = Watched {
            tcp: vec![(AddressFamily::Inet, port, ino)],
            unix: vec![],
            seen: std::collections::HashSet::new(),
        };
        let (waiting, accepting) = watched.accept_queue().unwrap();
        assert!(waiting.is_empty() && !accepting);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (waiting, accepting) = watched.accept_queue().unwrap();
        assert_eq!(
            (waiting.len(), accepting),
            (1, false),
            "queued, not accepted"
        );
        let again = watched.accept_queue().unwrap().0;
        assert_eq!(
            again, waiting,
            "the same connection (cookie) while it waits"
        );
        let (_server, _) = listener.accept().unwrap();
        let (waiting, accepting) = watched.accept_queue().unwrap();
        assert_eq!((waiting.len(), accepting), (0, true), "accepted and open");
    }

    #[test]
    fn sees_a_real_connection_on_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ino = nix::sys::stat::fstat(&listener).unwrap().st_ino;
        let mut watched = Watched {
            tcp: vec![(AddressFamily::Inet, port, ino)],
            unix: vec![],
            seen: std::collections::HashSet::new(),
        };
        assert!(!watched.sample().busy(), "nobody connected yet");
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let usage = watched.sample();
        assert_eq!(usage.queued, 1, "{usage:?}");
        let (server, _) = listener.accept().unwrap();
        let usage = watched.sample();
        assert_eq!(
            (usage.queued, usage.open),
            (0, 1),
            "the accepted side is open: {usage:?}"
        );
        assert!(watched.sample().busy(), "still open");
        // The server closes first (as after an HTTP/1.0 answer): TIME_WAIT on our side.
        drop(server);
        drop(client);
        let usage = watched.sample();
        assert_eq!(
            (usage.open, usage.new),
            (0, 0),
            "ended, and seen before: {usage:?}"
        );
        // A whole connection between two samples is still seen.
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        drop(server);
        drop(client);
        let usage = watched.sample();
        assert!(usage.new >= 1 && usage.busy(), "{usage:?}");
        assert!(!watched.sample().busy(), "and then idle again");
    }
}
