//! The sd_notify protocol in both directions.
//!
//! Inbound: the supervisor's own `NOTIFY_SOCKET` (a datagram socket with `SO_PASSCRED`) that
//! workers report `READY=1`, `STATUS=`, `WATCHDOG=1` to. The kernel tells us the sender's
//! pid, so only our workers (or their descendants in the worker's process group, such as
//! `systemd-notify`) are heard. Garbage is dropped with a log line, never trusted.
//!
//! Outbound: `READY=1`, `RELOADING=1`+`MONOTONIC_USEC=`, `STOPPING=1`, `STATUS=`,
//! `WATCHDOG=1` to systemd's `$NOTIFY_SOCKET` (silently skipped when it is unset).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, bind, recvmsg,
    setsockopt, socket, sockopt,
};
use nix::unistd::Pid;

use crate::error::{Context, Result};

/// The largest datagram accepted, as in systemd.
pub const MAX_DATAGRAM: usize = 4096;

/// What a worker told us, parsed from one datagram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyMsg {
    pub ready: bool,
    pub stopping: bool,
    pub reloading: bool,
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the worker asks to be treated as hung.
    pub watchdog_trigger: bool,
    pub status: Option<String>,
    pub errno: Option<i32>,
}

/// Parses an sd_notify datagram. Unknown keys are ignored (as systemd does); a datagram that
/// is empty, not UTF-8 or contains a NUL byte is rejected whole.
pub fn parse(bytes: &[u8]) -> Result<NotifyMsg, &'static str> {
    if bytes.is_empty() {
        return Err("empty datagram");
    }
    if bytes.len() > MAX_DATAGRAM {
        return Err("datagram larger than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("datagram contains a NUL byte");
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "datagram is not UTF-8")?;
    let mut msg = NotifyMsg::default();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match (key, value) {
            ("READY", "1") => msg.ready = true,
            ("STOPPING", "1") => msg.stopping = true,
            ("RELOADING", "1") => msg.reloading = true,
            ("WATCHDOG", "1") => msg.watchdog = true,
            ("WATCHDOG", "trigger") => msg.watchdog_trigger = true,
            ("STATUS", s) => {
                msg.status = Some(sanitize_status(&s.chars().take(256).collect::<String>()));
            }
            ("ERRNO", e) => msg.errno = e.parse().ok(),
            _ => {}
        }
    }
    Ok(msg)
}

/// Replaces control characters (ESC, BEL, CR, …) in a worker's `STATUS=` text, which is
/// shown in the operator's terminal by `clusterctl status`: a worker must not be able to
/// move the cursor, rewrite lines or ring bells there.
pub fn sanitize_status(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Rate limit for complaints about the notify and control sockets: at most
/// `PER_MINUTE` lines a minute, then one line saying how many were suppressed.
#[derive(Debug, Default)]
pub struct Complaints {
    window: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

/// What to do with one complaint.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `Some(n)`: first say that `n` were suppressed in the last window.
    Log(Option<u64>),
    /// Log it and say that further ones are suppressed for the rest of the window.
    LogLast,
    Suppress,
}

impl Complaints {
    pub const PER_MINUTE: u32 = 10;
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

    /// The decision for a complaint at `now`.
    pub fn verdict(&mut self, now: std::time::Instant) -> Verdict {
        let mut summary = None;
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Self::WINDOW)
        {
            if self.suppressed > 0 {
                summary = Some(self.suppressed);
            }
            *self = Complaints {
                window: Some(now),
                logged: 0,
                suppressed: 0,
            };
        }
        self.logged += 1;
        match self.logged.cmp(&Self::PER_MINUTE) {
            std::cmp::Ordering::Less => Verdict::Log(summary),
            std::cmp::Ordering::Equal => Verdict::LogLast,
            std::cmp::Ordering::Greater => {
                self.suppressed += 1;
                Verdict::Suppress
            }
        }
    }

    /// Logs `msg` as a warning, rate-limited.
    pub fn complain(&mut self, msg: std::fmt::Arguments<'_>) {
        match self.verdict(std::time::Instant::now()) {
            Verdict::Log(summary) => {
                if let Some(n) = summary {
                    tracing::warn!("suppressed {n} notify/control socket complaint(s)");
                }
                tracing::warn!("{msg}");
            }
            Verdict::LogLast => {
                tracing::warn!("{msg}");
                tracing::warn!(
                    "further notify/control socket complaints are suppressed for a minute"
                );
            }
            Verdict::Suppress => {}
        }
    }
}

/// One received datagram: who sent it and what it said.
#[derive(Debug)]
pub struct Datagram {
    /// The sender's pid, from the kernel (`SCM_CREDENTIALS`); `None` if it sent none.
    pub pid: Option<Pid>,
    pub msg: Result<NotifyMsg, &'static str>,
}

/// The supervisor's notify socket. The socket file is removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    path: PathBuf,
    /// A directory we created for the socket (removed on drop), if any.
    tmpdir: Option<PathBuf>,
    buf: Vec<u8>,
}

impl NotifySocket {
    /// Binds in `$RUNTIME_DIRECTORY` (systemd's per-service directory) when set, else in a
    /// fresh private directory under `$XDG_RUNTIME_DIR` or `/tmp`.
    pub fn bind() -> Result<NotifySocket> {
        let runtime = std::env::var_os("RUNTIME_DIRECTORY")
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .map(PathBuf::from)
            })
            .filter(|p| p.is_dir());
        let (dir, tmpdir) = if let Some(dir) = runtime {
            (dir, None)
        } else {
            let base = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|p| p.is_dir())
                .unwrap_or_else(|| PathBuf::from("/tmp"));
            let dir = nix::unistd::mkdtemp(&base.join("clusterctl.XXXXXX"))
                .context(|| format!("cannot create a private directory in {}", base.display()))?;
            (dir.clone(), Some(dir))
        };
        let path = dir.join(format!("notify.{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .context(|| "cannot create the notify socket".into())?;
        setsockopt(&fd, sockopt::PassCred, &true)
            .context(|| "cannot enable SO_PASSCRED on the notify socket".into())?;
        let addr = UnixAddr::new(&path).context(|| format!("bad path {}", path.display()))?;
        bind(fd.as_raw_fd(), &addr)
            .context(|| format!("cannot bind the notify socket {}", path.display()))?;
        Ok(NotifySocket {
            fd,
            path,
            tmpdir,
            buf: vec![0; MAX_DATAGRAM + 1],
        })
    }

    /// The notify socket of the previous image (`clusterctl upgrade`): same fd, same path,
    /// so the workers' `NOTIFY_SOCKET` keeps working; queued datagrams are read after.
    pub fn adopt(fd: OwnedFd, path: PathBuf, tmpdir: Option<PathBuf>) -> NotifySocket {
        NotifySocket {
            fd,
            path,
            tmpdir,
            buf: vec![0; MAX_DATAGRAM + 1],
        }
    }

    /// The directory created for the socket, if any (handed over by `clusterctl upgrade`).
    pub fn tmpdir(&self) -> Option<&std::path::Path> {
        self.tmpdir.as_deref()
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Receives one datagram; `Ok(None)` when there is none waiting.
    pub fn recv(&mut self) -> std::io::Result<Option<Datagram>> {
        // Room for the most fds one message can carry (SCM_MAX_FD), so the control data is
        // never truncated: every fd that arrives is closed below.
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 253]);
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let res = recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_TRUNC,
        );
        let msg = match res {
            Ok(m) => m,
            Err(nix::Error::EAGAIN | nix::Error::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = msg.bytes;
        let truncated =
            msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut pid = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::ScmCredentials(cred) => {
                        pid = Some(Pid::from_raw(cred.pid()));
                    }
                    ControlMessageOwned::ScmRights(fds) => {
                        // e.g. BARRIER=1 from systemd-notify: closing the fd is the answer.
                        for fd in fds {
                            let _ = nix::unistd::close(fd);
                        }
                    }
                    _ => {}
                }
            }
        }
        let parsed = if truncated || len > MAX_DATAGRAM {
            Err("datagram larger than 4096 bytes")
        } else {
            parse(&self.buf[..len])
        };
        Ok(Some(Datagram { pid, msg: parsed }))
    }
}

impl std::os::fd::AsFd for NotifySocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(d) = &self.tmpdir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Messages the supervisor sends to systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    Ready,
    /// `RELOADING=1` together with `MONOTONIC_USEC=` (filled in when sent).
    Reloading,
    Stopping,
    Status(String),
    Watchdog,
    /// `EXTEND_TIMEOUT_USEC=`
    ExtendTimeout(std::time::Duration),
}

/// systemd's watchdog interval for the supervisor (`WATCHDOG_USEC`, when `WATCHDOG_PID` is
/// unset or ours), through sd-notify's `sd_watchdog_enabled(3)`; 0 means none.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Sends one datagram with all `msgs` to `$NOTIFY_SOCKET`. Does nothing when unset.
pub fn send_upstream(msgs: &[Upstream]) -> std::io::Result<()> {
    use sd_notify::NotifyState;
    if msgs.is_empty() || std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let mut states = Vec::with_capacity(msgs.len() + 1);
    for m in msgs {
        match m {
            Upstream::Ready => states.push(NotifyState::Ready),
            Upstream::Reloading => {
                states.push(NotifyState::Reloading);
                states.push(NotifyState::monotonic_usec_now()?);
            }
            Upstream::Stopping => states.push(NotifyState::Stopping),
            Upstream::Status(s) => states.push(NotifyState::Status(s)),
            Upstream::Watchdog => states.push(NotifyState::Watchdog),
            Upstream::ExtendTimeout(d) => states.push(NotifyState::ExtendTimeoutUsec(
                u32::try_from(d.as_micros()).unwrap_or(u32::MAX),
            )),
        }
    }
    sd_notify::notify(&states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_loses_control_characters() {
        let m = parse(b"STATUS=ok\x1b[2J\x07\rgone\tx").unwrap();
        assert_eq!(m.status.as_deref(), Some("ok?[2J??gone?x"));
        assert_eq!(sanitize_status("caf\u{e9} 3/4"), "caf\u{e9} 3/4");
    }

    #[test]
    fn complaints_are_rate_limited_per_minute() {
        let t0 = std::time::Instant::now();
        let mut c = Complaints::default();
        for _ in 1..Complaints::PER_MINUTE {
            assert_eq!(c.verdict(t0), Verdict::Log(None));
        }
        assert_eq!(c.verdict(t0), Verdict::LogLast);
        for _ in 0..5 {
            assert_eq!(
                c.verdict(t0 + std::time::Duration::from_secs(30)),
                Verdict::Suppress
            );
        }
        // A minute later: heard again, with the count of what was suppressed.
        assert_eq!(
            c.verdict(t0 + std::time::Duration::from_secs(61)),
            Verdict::Log(Some(5))
        );
        assert_eq!(
            c.verdict(t0 + std::time::Duration::from_secs(62)),
            Verdict::Log(None)
        );
    }

    #[test]
    fn parses_known_keys_and_ignores_unknown() {
        let m = parse(b"READY=1\nSTATUS=serving 3 requests\nX_FOO=bar\nMAINPID=12\n").unwrap();
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving 3 requests"));
        let m = parse(b"WATCHDOG=1").unwrap();
        assert!(m.watchdog && !m.ready);
        assert!(parse(b"WATCHDOG=trigger").unwrap().watchdog_trigger);
        assert!(!parse(b"READY=0").unwrap().ready);
        assert!(parse(b"STOPPING=1\nRELOADING=1").unwrap().stopping);
        assert_eq!(parse(b"ERRNO=2").unwrap().errno, Some(2));
        assert_eq!(
            parse(b"garbage without equals").unwrap(),
            NotifyMsg::default()
        );
    }

    #[test]
    fn rejects_malformed_datagrams() {
        assert!(parse(b"").is_err());
        assert!(parse(b"READY=1\0").is_err());
        assert!(parse(&[0xff, 0xfe, b'=', b'1']).is_err());
        assert!(parse(&vec![b'x'; MAX_DATAGRAM + 1]).is_err());
    }

    #[test]
    fn long_status_is_cut() {
        let long = format!("STATUS={}", "é".repeat(1000));
        assert_eq!(
            parse(long.as_bytes())
                .unwrap()
                .status
                .unwrap()
                .chars()
                .count(),
            256
        );
    }
}
