//! The control socket: how `clusterctl reload/restart/status/scale` talk to a running
//! supervisor. A unix stream socket with owner-only permissions in `$RUNTIME_DIRECTORY`
//! (`RuntimeDirectory=APP` → `/run/APP/control.sock`) or at `--control PATH`.
//!
//! Protocol: the client sends one request line, the supervisor answers and closes.
//! Requests: `reload`, `reload --wait`, `rolling`, `rolling --wait`, `status`,
//! `status --json`, `scale N`. Answers start with `ok` or `error`, followed by text;
//! `--wait` requests are answered when the reload finished.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// The largest request accepted.
const MAX_REQUEST: usize = 8192;

/// A parsed control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Reload {
        rolling: bool,
        wait: bool,
    },
    Status {
        json: bool,
    },
    Scale(u32),
    /// `clusterctl upgrade`: re-execute the supervisor (see `supervisor::handover`).
    Upgrade {
        wait: bool,
        binary: Option<PathBuf>,
    },
}

impl std::str::FromStr for Request {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reload"] => Ok(Request::Reload {
                rolling: false,
                wait: false,
            }),
            ["reload", "--wait"] => Ok(Request::Reload {
                rolling: false,
                wait: true,
            }),
            ["rolling"] => Ok(Request::Reload {
                rolling: true,
                wait: false,
            }),
            ["rolling", "--wait"] => Ok(Request::Reload {
                rolling: true,
                wait: true,
            }),
            ["upgrade", rest @ ..] => {
                let mut wait = false;
                let mut binary = None;
                let mut it = rest.iter();
                while let Some(w) = it.next() {
                    match *w {
                        "--wait" => wait = true,
                        "--binary" => {
                            let p = it.next().ok_or("upgrade --binary needs a path")?;
                            binary = Some(PathBuf::from(std::ffi::OsString::from_vec(
                                crate::supervisor::handover::unescape(p)
                                    .ok_or_else(|| format!("bad path {p:?}"))?,
                            )));
                        }
                        _ => return Err(format!("unknown request {line:?}")),
                    }
                }
                Ok(Request::Upgrade { wait, binary })
            }
            ["status"] => Ok(Request::Status { json: false }),
            ["status", "--json"] => Ok(Request::Status { json: true }),
            ["scale", n] => {
                let w: crate::config::Workers = n.parse()?;
                match w {
                    crate::config::Workers::Count(n) => Ok(Request::Scale(n)),
                    crate::config::Workers::Auto => Ok(Request::Scale(w.resolve())),
                }
            }
            _ => Err(format!("unknown request {line:?}")),
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Reload { rolling, wait } => {
                f.write_str(if *rolling { "rolling" } else { "reload" })?;
                if *wait {
                    f.write_str(" --wait")?;
                }
                Ok(())
            }
            Request::Status { json } => f.write_str(if *json { "status --json" } else { "status" }),
            Request::Scale(n) => write!(f, "scale {n}"),
            Request::Upgrade { wait, binary } => {
                f.write_str("upgrade")?;
                if *wait {
                    f.write_str(" --wait")?;
                }
                if let Some(b) = binary {
                    use std::os::unix::ffi::OsStrExt;
                    let p = crate::supervisor::handover::escape(b.as_os_str().as_bytes());
                    write!(f, " --binary {p}")?;
                }
                Ok(())
            }
        }
    }
}

/// The supervisor's listening control socket; the file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created: only that file is removed at stop.
    id: Option<(u64, u64)>,
}

/// Device and inode of the file at `path` (not following a symlink).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl ControlSocket {
    /// Where the control socket goes by default: `$RUNTIME_DIRECTORY/control.sock`.
    pub fn default_path() -> Option<PathBuf> {
        let dir = std::env::var_os("RUNTIME_DIRECTORY")?;
        let first = dir.to_str()?.split(':').next()?.to_string();
        Some(Path::new(&first).join("control.sock"))
    }

    /// Binds with owner-only permissions. Only a stale *socket* at `path` (nobody
    /// listening) is replaced; a live one means another supervisor owns it; anything else
    /// (a file, a directory, a fifo) is refused and left alone.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(Error::config(format!(
                        "control socket {} is in use by another running supervisor",
                        path.display()
                    )));
                }
                std::fs::remove_file(path)
                    .context(|| format!("cannot remove stale control socket {}", path.display()))?;
            }
            Ok(meta) if meta.is_dir() => {
                return Err(Error::config(format!(
                    "--control {} is a directory; give the path of the socket to create,                      e.g. --control {}",
                    path.display(),
                    path.join("control.sock").display()
                )));
            }
            Ok(_) => {
                return Err(Error::config(format!(
                    "--control {} exists and is not a socket; refusing to replace it \
                     (remove it yourself or choose another path)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).context(|| format!("cannot inspect --control {}", path.display()));
            }
        }
        // Changing the process umask briefly is safe: the only other thread (the journald
        // log thread) creates no files.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let listener = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener =
            listener.context(|| format!("cannot create control socket {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context(|| "cannot make the control socket non-blocking".into())?;
        let id = file_id(path);
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            id,
        })
    }

    /// The control socket of a supervisor run by hand (no `--control`, no systemd
    /// `RuntimeDirectory=`): `DIR/PROGRAM.PID.sock` in [`by_hand_dir`], which
    /// `clusterctl status` without arguments searches.
    pub fn bind_by_hand(program: &Path) -> Result<ControlSocket> {
        let dir = by_hand_dir();
        private_dir(&dir)?;
        let name: String = program
            .file_name()
            .map_or_else(|| "worker".into(), |f| f.to_string_lossy().into_owned())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        remove_dead_by_hand(&dir);
        ControlSocket::bind(&dir.join(format!("{name}.{}.sock", std::process::id())))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the socket file (handed over by `clusterctl upgrade`).
    pub fn file_id(&self) -> Option<(u64, u64)> {
        self.id
    }

    /// The control socket of the previous image (`clusterctl upgrade`); clients that
    /// connected during the exec wait in its backlog.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: PathBuf, id: Option<(u64, u64)>) -> ControlSocket {
        let listener = UnixListener::from(fd);
        let _ = listener.set_nonblocking(true);
        ControlSocket { listener, path, id }
    }

    /// Accepts a pending client: `Ok(None)` when there is none. Its request is read as it
    /// arrives, from the event loop (`Client::read_request`): a slow or silent client never
    /// blocks it. `Err` is the accept error (EMFILE: the caller must make room or stop
    /// polling the listener for a while, or it would spin).
    pub fn accept(&self) -> std::io::Result<Option<Client>> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    return Ok(Some(Client {
                        stream,
                        buf: Vec::with_capacity(64),
                        deadline: Instant::now() + REQUEST_TIMEOUT,
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EINTR | nix::libc::ECONNABORTED | nix::libc::EPROTO)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// How many control clients may be pending at once: at most 64, fewer when the fd limit
/// is low (half of what is left after a reserve of 64 fds for spawning workers).
pub fn client_cap() -> usize {
    let limit = crate::sys::nofile_limit();
    let open = std::fs::read_dir("/proc/self/fd").map_or(16, Iterator::count);
    let spare = limit.saturating_sub(u64::try_from(open).unwrap_or(16) + 64) / 2;
    usize::try_from(spare.clamp(1, 64)).unwrap_or(64)
}

/// Where supervisors run by hand put their control socket: `$XDG_RUNTIME_DIR/clusterctl`,
/// else `/run/clusterctl` for root, else `$TMPDIR/clusterctl-UID`.
pub fn by_hand_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
    {
        return x.join("clusterctl");
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        PathBuf::from("/run/clusterctl")
    } else {
        std::env::temp_dir().join(format!("clusterctl-{uid}"))
    }
}

/// Removes the sockets of by-hand supervisors that were killed (`NAME.PID.sock` whose PID
/// no longer exists), so that `clusterctl status` does not trip over them.
fn remove_dead_by_hand(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let pid = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.rsplit('.').next())
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|p| *p > 0);
        let dead = pid.is_some_and(|pid| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::Error::ESRCH)
        });
        let socket = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket());
        if dead && socket && p.extension().is_some_and(|x| x == "sock") {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Creates `dir` (mode 0700) or checks that it is ours and not writable by others.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).context(|| format!("cannot create {}", dir.display())),
    }
    let meta =
        std::fs::symlink_metadata(dir).context(|| format!("cannot stat {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(Error::config(format!(
            "{} is not a private directory of this user",
            dir.display()
        )));
    }
    Ok(())
}

/// The live control sockets of supervisors run by hand, and those of units
/// (`/run/*/control.sock`, `$XDG_RUNTIME_DIR/*/control.sock`): the ones that accept a
/// connection.
pub fn running() -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let is_socket =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    if let Ok(d) = std::fs::read_dir(by_hand_dir()) {
        for e in d.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sock") && is_socket(&p) {
                found.push(p);
            }
        }
    }
    let mut bases = vec![PathBuf::from("/run")];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        bases.push(PathBuf::from(x));
    }
    for base in bases {
        if let Ok(d) = std::fs::read_dir(&base) {
            for e in d.flatten() {
                let p = e.path().join("control.sock");
                if is_socket(&p) {
                    found.push(p);
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found.retain(|p| UnixStream::connect(p).is_ok());
    found
}

/// The one running supervisor among `live`, or a usage error (exit 2) that lists them or
/// says how to start one.
fn choose(mut live: Vec<PathBuf>) -> Result<PathBuf> {
    match live.len() {
        1 => Ok(live.remove(0)),
        0 => Err(Error::Usage(format!(
            "no running supervisor found (searched {} and /run/*/control.sock): give the unit \
             name (e.g. `clusterctl status myapp`) or --control PATH",
            by_hand_dir().display()
        ))),
        _ => Err(Error::Usage(format!(
            "several supervisors are running; choose one with --control PATH:\n  {}",
            live.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        ))),
    }
}

/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected control client whose request line is still arriving.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Dropped (with an error answer) if the request is not complete by then.
    pub deadline: Instant,
}

impl Client {
    /// Reads what has arrived without blocking. `Some` once the request is complete (or
    /// broken); `None` while more is to come.
    pub fn read_request(&mut self) -> Option<Result<Request, String>> {
        let mut chunk = [0u8; 256];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(Err("connection closed before a request".into())),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                        return Some(
                            std::str::from_utf8(&self.buf[..end])
                                .map_err(|_| "request is not UTF-8".to_string())
                                .and_then(str::parse),
                        );
                    }
                    if self.buf.len() > MAX_REQUEST {
                        return Some(Err("request too long".into()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(format!("cannot read request: {e}"))),
            }
        }
    }

    /// The connection, for the answer.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsFd for ControlSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for ControlSocket {
    /// Removes the socket file, if it is still the one we created (not a file someone put
    /// there since).
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How long a client may take to read its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// An answer still being written to a client that does not read it fast enough.
#[derive(Debug)]
pub struct Outgoing {
    stream: UnixStream,
    text: Vec<u8>,
    done: usize,
    /// Given up (connection closed) if the answer is not written by then.
    pub deadline: Instant,
}

impl Outgoing {
    /// Writes what the socket takes without blocking; true once finished (written, failed
    /// or past the deadline: the connection is then closed by dropping it).
    pub fn flush(&mut self, now: Instant) -> bool {
        while self.done < self.text.len() {
            match self.stream.write(&self.text[self.done..]) {
                Ok(0) => return true,
                Ok(n) => self.done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return now >= self.deadline;
                }
                Err(_) => return true,
            }
        }
        true
    }
}

impl AsFd for Outgoing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Writes a final answer without blocking and closes the connection. What does not fit in
/// the socket buffer now is returned, to be finished (`Outgoing::flush`) when the client
/// reads, for at most `ANSWER_TIMEOUT`.
pub fn answer(stream: UnixStream, result: std::result::Result<String, String>) -> Option<Outgoing> {
    let _ = stream.set_nonblocking(true);
    let text = match result {
        Ok(t) => format!("ok {t}\n"),
        Err(e) => format!("error {e}\n"),
    };
    let mut out = Outgoing {
        stream,
        text: text.into_bytes(),
        done: 0,
        deadline: Instant::now() + ANSWER_TIMEOUT,
    };
    (!out.flush(Instant::now())).then_some(out)
}

/// Finds the control socket: `--control PATH`, or the one of unit `APP`
/// (`/run/APP/control.sock`, or `$XDG_RUNTIME_DIR/APP/control.sock` for user units).
pub fn locate(app: Option<&str>, control: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = control {
        return Ok(p.to_path_buf());
    }
    let Some(app) = app else {
        return choose(running());
    };
    let app = app.strip_suffix(".service").unwrap_or(app);
    if app.is_empty() || app.contains('/') {
        return Err(Error::config(format!("invalid unit name {app:?}")));
    }
    let mut candidates = vec![Path::new("/run").join(app).join("control.sock")];
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR") {
        candidates.insert(0, Path::new(&xdg).join(app).join("control.sock"));
    }
    for c in &candidates {
        if c.exists() {
            return Ok(c.clone());
        }
    }
    // A supervisor of program APP run by hand.
    let prefix = format!("{app}.");
    let by_hand: Vec<PathBuf> = running()
        .into_iter()
        .filter(|p| {
            p.parent() == Some(by_hand_dir().as_path())
                && p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    if !by_hand.is_empty() {
        return choose(by_hand);
    }
    Err(Error::Unavailable(format!(
        "{app} is not running (no control socket at {}); is the unit started? \
         (`systemctl status {app}`)",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

/// Sends `request` and returns the supervisor's answer text (without `ok `), or an error
/// (`error ...` answers become `Error::Failed`, exit 1).
pub fn call(path: &Path, request: &Request, timeout: Option<Duration>) -> Result<String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        Error::Unavailable(format!(
            "cannot reach the supervisor at {}: {e}{}",
            path.display(),
            match e.kind() {
                std::io::ErrorKind::PermissionDenied => " (run as the service's user or root)",
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound =>
                    " (is it running?)",
                _ => "",
            }
        ))
    })?;
    // A peer that is not a clusterctl supervisor may answer and close before reading our
    // request (EPIPE here): then what it sent decides, below.
    let sent = stream.write_all(format!("{request}\n").as_bytes());
    let _ = stream.set_read_timeout(timeout);
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Failed(format!(
                    "no answer within {:?}",
                    started.elapsed()
                )));
            }
            // A peer that answered and closed without reading our request resets the
            // connection: judge what it sent.
            Err(_) if !raw.is_empty() => break,
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "{} does not speak the clusterctl control protocol ({e})",
                    path.display()
                )));
            }
        }
    }
    if let (Err(e), true) = (&sent, raw.is_empty()) {
        return Err(Error::Unavailable(format!(
            "{} does not speak the clusterctl control protocol (it closed the connection: {e})",
            path.display()
        )));
    }
    let out = String::from_utf8_lossy(&raw).into_owned();
    if let Some(rest) = out.strip_prefix("ok") {
        Ok(rest.strip_prefix(' ').unwrap_or(rest).to_string())
    } else if let Some(rest) = out.strip_prefix("error ") {
        Err(Error::Failed(rest.trim_end().to_string()))
    } else if out.is_empty() {
        Err(Error::Failed(
            "the supervisor closed the connection without an answer (it may be stopping)".into(),
        ))
    } else {
        Err(Error::Unavailable(format!(
            "{} does not speak the clusterctl control protocol (answer {:?})",
            path.display(),
            out.chars().take(80).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Reload {
                rolling: false,
                wait: true,
            },
            Request::Reload {
                rolling: true,
                wait: false,
            },
            Request::Status { json: true },
            Request::Status { json: false },
            Request::Scale(7),
        ] {
            assert_eq!(r.to_string().parse::<Request>(), Ok(r));
        }
        assert!("scale 0".parse::<Request>().is_err());
        assert!("explode".parse::<Request>().is_err());
    }

    #[test]
    fn answers_never_block_on_a_client_that_does_not_read() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // Far more than a socket buffer holds.
        let big = "x".repeat(8 << 20);
        let started = Instant::now();
        let mut pending = answer(ours, Ok(big)).expect("the rest waits for the reader");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answer() did not block"
        );
        assert!(
            !pending.flush(Instant::now()),
            "still waiting for the reader"
        );
        assert!(pending.flush(pending.deadline), "given up at the deadline");
        drop(theirs);
        // A small answer is written at once.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        assert!(answer(ours, Err("nope".into())).is_none());
        let mut text = String::new();
        theirs.read_to_string(&mut text).unwrap();
        assert_eq!(text, "error nope\n");
    }

    #[test]
    fn locate_needs_a_name_or_path() {
        assert_eq!(choose(Vec::new()).unwrap_err().exit_code(), exit::USAGE);
        let two = vec![PathBuf::from("/a.sock"), PathBuf::from("/b.sock")];
        let e = choose(two).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(e.to_string().contains("/a.sock") && e.to_string().contains("/b.sock"));
        assert_eq!(
            choose(vec![PathBuf::from("/a.sock")]).unwrap(),
            PathBuf::from("/a.sock")
        );
        assert_eq!(
            locate(Some("definitely-not-running-app"), None)
                .unwrap_err()
                .exit_code(),
            exit::UNAVAILABLE
        );
        assert_eq!(
            locate(None, Some(Path::new("/x"))).unwrap(),
            PathBuf::from("/x")
        );
    }
}
