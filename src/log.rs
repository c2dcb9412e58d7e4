//! clusterctl's own log: structured entries to journald (fields `WORKER_ID`, `GENERATION`,
//! `WORKER_PID`, queryable with `journalctl -u APP WORKER_ID=2`) when stderr is the journal
//! or `--log journald` is given; readable lines on stderr otherwise.

use std::os::fd::AsFd;

use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

use crate::cli::LogTarget;
use crate::supervisor::event::WorkerTag;

/// True when our stderr is connected to the journal: `$JOURNAL_STREAM` (`DEV:INODE`, set by
/// systemd) matches stderr's device and inode.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().is_ok_and(|d| d == st.st_dev)
        && ino.parse::<u64>().is_ok_and(|i| i == st.st_ino)
}

/// Installs the global subscriber. Returns a warning to log once the logger is up, if the
/// journal was wanted but is not reachable.
pub fn init(target: LogTarget) -> Option<String> {
    let want_journal = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_journal(),
    };
    let mut warning = None;
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_field_prefix(None);
                let sub = tracing_subscriber::registry()
                    .with(layer)
                    .with(tracing_subscriber::filter::LevelFilter::INFO);
                if tracing::subscriber::set_global_default(sub).is_ok() {
                    return None;
                }
            }
            Err(e) => {
                warning = Some(format!(
                    "journald is not reachable ({e}); logging to stderr"
                ));
            }
        }
    }
    let sub = tracing_subscriber::fmt()
        .with_writer(|| LossyStderr(nonblocking_stderr()))
        .with_target(false)
        .with_ansi(false)
        .with_max_level(Level::INFO)
        .finish();
    let _ = tracing::subscriber::set_global_default(sub);
    warning
}

/// Log lines dropped because stderr was full (a reader that stopped reading).
pub static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The supervisor's own handle on stderr. When stderr is a pipe or a terminal, it is a
/// second, non-blocking open file description of it (through `/proc/self/fd/2`), so a
/// log reader that stops reading can never freeze the event loop (lines are dropped and
/// counted instead); workers keep the original, blocking description. Regular files and
/// sockets (the journal) never block for long and are used as they are.
fn nonblocking_stderr() -> Option<&'static std::fs::File> {
    static FILE: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let meta = std::fs::metadata("/proc/self/fd/2").ok()?;
        let kind = meta.file_type();
        if !(kind.is_fifo() || kind.is_char_device()) {
            return None;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open("/proc/self/fd/2")
            .ok()
    })
    .as_ref()
}

/// A stderr writer that drops what does not fit instead of blocking.
struct LossyStderr(Option<&'static std::fs::File>);

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(mut file) = self.0 else {
            return std::io::stderr().write(buf);
        };
        match file.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Emits one supervisor event, with the worker's fields when it concerns a worker.
pub fn event(level: Level, worker: Option<WorkerTag>, message: &str) {
    macro_rules! emit {
        ($lvl:expr) => {
            match worker {
                Some(WorkerTag {
                    slot,
                    generation,
                    pid: Some(pid),
                }) => tracing::event!(
                    $lvl,
                    WORKER_ID = slot,
                    GENERATION = generation,
                    WORKER_PID = pid.as_raw(),
                    "{message}"
                ),
                Some(WorkerTag {
                    slot,
                    generation,
                    pid: None,
                }) => {
                    tracing::event!($lvl, WORKER_ID = slot, GENERATION = generation, "{message}")
                }
                None => tracing::event!($lvl, "{message}"),
            }
        };
    }
    match level {
        Level::ERROR => emit!(Level::ERROR),
        Level::WARN => emit!(Level::WARN),
        Level::INFO => emit!(Level::INFO),
        Level::DEBUG => emit!(Level::DEBUG),
        _ => emit!(Level::TRACE),
    }
}
