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
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result, exit};

/// The largest request accepted.
const MAX_REQUEST: usize = 256;

/// A parsed control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Reload { rolling: bool, wait: bool },
    Status { json: bool },
    Scale(u32),
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
        }
    }
}

/// The supervisor's listening control socket; the file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Where the control socket goes by default: `$RUNTIME_DIRECTORY/control.sock`.
    pub fn default_path() -> Option<PathBuf> {
        let dir = std::env::var_os("RUNTIME_DIRECTORY")?;
        let first = dir.to_str()?.split(':').next()?.to_string();
        Some(Path::new(&first).join("control.sock"))
    }

    /// Binds with owner-only permissions. A stale socket file (nobody listening) is
    /// replaced; a live one means another supervisor owns it: error.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::config(format!(
                "control socket {} is in use by another running supervisor",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
        // Single-threaded here, so changing the process umask briefly is safe.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let listener = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener =
            listener.context(|| format!("cannot create control socket {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context(|| "cannot make the control socket non-blocking".into())?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts a pending client, if any. Its request is read as it arrives, from the
    /// event loop (`Client::read_request`): a slow or silent client never blocks it.
    pub fn accept(&self) -> Option<Client> {
        let (stream, _) = self.listener.accept().ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(Client {
            stream,
            buf: Vec::with_capacity(64),
            deadline: Instant::now() + REQUEST_TIMEOUT,
        })
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
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes a final answer and closes the connection. The write blocks for at most 2 s (a
/// client that does not read its answer).
pub fn answer(mut stream: UnixStream, result: std::result::Result<String, String>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let text = match result {
        Ok(t) => format!("ok {t}\n"),
        Err(e) => format!("error {e}\n"),
    };
    let _ = stream.write_all(text.as_bytes());
}

/// Finds the control socket: `--control PATH`, or the one of unit `APP`
/// (`/run/APP/control.sock`, or `$XDG_RUNTIME_DIR/APP/control.sock` for user units).
pub fn locate(app: Option<&str>, control: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = control {
        return Ok(p.to_path_buf());
    }
    let Some(app) = app else {
        return Err(Error::config(
            "which supervisor? Give the unit name (e.g. `clusterctl status myapp`) or --control PATH",
        ));
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

/// Exit code for a control command's error.
pub fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Unavailable(_) => exit::UNAVAILABLE,
        other => other.exit_code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn locate_needs_a_name_or_path() {
        assert_eq!(locate(None, None).unwrap_err().exit_code(), exit::CONFIG);
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
