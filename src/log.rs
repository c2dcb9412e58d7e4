//! clusterctl's own log: structured entries to journald (fields `WORKER_ID`, `GENERATION`,
//! `WORKER_PID`, queryable with `journalctl -u APP WORKER_ID=2`) when stderr is the journal
//! or `--log journald` is given; readable lines on stderr otherwise.
//!
//! Logging can never stop or kill the supervisor:
//! - journald entries are handed to a log thread through a bounded queue (never waiting:
//!   when it is full, the entry is dropped and counted), and that thread does the
//!   possibly blocking `send_to` (tracing-journald), so a stalled journald stalls nobody;
//! - stderr lines go through a non-blocking description of stderr where possible, and
//!   every write error (a full pipe, EPIPE after the reader exited, EIO, ENOSPC, a closed
//!   fd 2) drops the line and counts it instead of being reported (tracing-subscriber
//!   would report it with `eprintln!`, which panics, and `panic = "abort"`).

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

use crate::cli::LogTarget;

/// Identifies a worker in log lines (journald fields WORKER_ID, GENERATION, WORKER_PID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerTag {
    pub slot: u32,
    pub generation: u32,
    pub pid: Option<nix::unistd::Pid>,
}

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

/// Entries waiting for the journald log thread, at most.
const QUEUE: usize = 4096;

/// True once the journald layer is installed: log lines then carry the worker fields as
/// journal fields; on stderr, the message alone says what they say.
static JOURNAL: AtomicBool = AtomicBool::new(false);

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
                let journal = tracing::Dispatch::new(
                    tracing_subscriber::registry()
                        .with(layer)
                        .with(tracing_subscriber::filter::LevelFilter::INFO),
                );
                let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
                // The thread starts with every signal blocked (it inherits the mask): the
                // supervisor's signals (SIGCHLD, SIGTERM, …) must stay pending for the
                // main thread's signalfd, never be delivered to this thread.
                let all = nix::sys::signal::SigSet::all();
                let mut old = nix::sys::signal::SigSet::empty();
                let blocked = nix::sys::signal::pthread_sigmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&all),
                    Some(&mut old),
                );
                let spawned = match blocked {
                    Ok(()) => std::thread::Builder::new()
                        .name("journald".into())
                        .spawn(move || journal_thread(&journal, &rx)),
                    Err(e) => Err(std::io::Error::from(e)),
                };
                let _ = nix::sys::signal::pthread_sigmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&old),
                    None,
                );
                match spawned {
                    Ok(_) => {
                        let _ = QUEUE_TX.set(tx.clone());
                        let sub = tracing_subscriber::registry()
                            .with(HandOff(tx))
                            .with(tracing_subscriber::filter::LevelFilter::INFO);
                        if tracing::subscriber::set_global_default(sub).is_ok() {
                            JOURNAL.store(true, Ordering::Relaxed);
                            return None;
                        }
                    }
                    Err(e) => {
                        warning = Some(format!(
                            "cannot start the journald log thread ({e}); logging to stderr"
                        ));
                    }
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
        .log_internal_errors(false)
        .finish();
    let _ = tracing::subscriber::set_global_default(sub);
    warning
}

/// Log lines dropped: stderr full (a reader that stopped reading) or broken, or the
/// journald queue full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// One log entry on its way to the journald thread.
#[derive(Debug)]
struct Record {
    level: Level,
    worker: Option<WorkerTag>,
    message: String,
    /// A flush marker (`flush`): answered once every entry queued before it is written.
    done: Option<SyncSender<()>>,
}

/// The log thread's queue, for `flush`.
static QUEUE_TX: std::sync::OnceLock<SyncSender<Record>> = std::sync::OnceLock::new();

/// Waits (at most `timeout`) until the journald log thread wrote everything queued so far:
/// `clusterctl upgrade` calls it right before `execve`, which ends that thread. Returns
/// false if the queue was not drained in time.
pub fn flush(timeout: std::time::Duration) -> bool {
    let Some(tx) = QUEUE_TX.get() else {
        return true;
    };
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
    let marker = Record {
        level: Level::INFO,
        worker: None,
        message: String::new(),
        done: Some(done_tx),
    };
    if tx.try_send(marker).is_err() {
        return false;
    }
    done_rx.recv_timeout(timeout).is_ok()
}

/// The layer on the event loop's side: captures an event and queues it, never waiting.
struct HandOff(SyncSender<Record>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HandOff {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut v = Fields::default();
        event.record(&mut v);
        let worker = match (v.slot, v.generation) {
            (Some(slot), Some(generation)) => Some(WorkerTag {
                slot,
                generation,
                pid: v.pid.map(nix::unistd::Pid::from_raw),
            }),
            _ => None,
        };
        let record = Record {
            level: *event.metadata().level(),
            worker,
            message: v.message,
            done: None,
        };
        match self.0.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The fields `event()` and the `tracing` macros produce.
#[derive(Default)]
struct Fields {
    message: String,
    slot: Option<u32>,
    generation: Option<u32>,
    pid: Option<i32>,
}

impl Fields {
    fn number(&mut self, name: &str, n: Option<i64>) {
        match name {
            "WORKER_ID" => self.slot = n.and_then(|n| u32::try_from(n).ok()),
            "GENERATION" => self.generation = n.and_then(|n| u32::try_from(n).ok()),
            "WORKER_PID" => self.pid = n.and_then(|n| i32::try_from(n).ok()),
            _ => {}
        }
    }
}

impl tracing::field::Visit for Fields {
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.number(field.name(), Some(value));
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.number(field.name(), i64::try_from(value).ok());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// The log thread: writes queued entries to journald with tracing-journald (its own
/// dispatcher, so they are not queued again). Ends when the supervisor exits.
fn journal_thread(journal: &tracing::Dispatch, rx: &Receiver<Record>) {
    tracing::dispatcher::with_default(journal, || {
        while let Ok(r) = rx.recv() {
            if let Some(done) = r.done {
                let _ = done.send(());
                continue;
            }
            emit(r.level, r.worker, &r.message);
        }
    });
}

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

/// A stderr writer that never fails and never blocks: what cannot be written (a full
/// pipe, a reader gone, a full disk, no stderr at all) is dropped and counted.
struct LossyStderr(Option<&'static std::fs::File>);

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = match self.0 {
            Some(mut file) => file.write(buf),
            None => std::io::stderr().write(buf),
        };
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(e),
            Ok(n) => Ok(n),
            Err(_) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Emits one supervisor event, with the worker's fields when it concerns a worker. On
/// stderr, a field is shown only when the message does not already say it.
pub fn event(level: Level, worker: Option<WorkerTag>, message: &str) {
    if JOURNAL.load(Ordering::Relaxed) {
        emit(level, worker, message);
    } else {
        let line = match worker {
            Some(tag) => with_missing_fields(message, tag),
            None => message.to_string(),
        };
        emit(level, None, &line);
    }
}

/// `message`, followed by the worker's slot, generation and pid where it does not mention
/// them already.
fn with_missing_fields(message: &str, tag: WorkerTag) -> String {
    let mut missing = Vec::new();
    if !message.contains(&format!("worker {}", tag.slot)) {
        missing.push(format!("worker {}", tag.slot));
    }
    if !message.contains(&format!("generation {}", tag.generation)) {
        missing.push(format!("generation {}", tag.generation));
    }
    if let Some(pid) = tag.pid
        && !message.contains(&pid.to_string())
    {
        missing.push(format!("pid {pid}"));
    }
    if missing.is_empty() {
        message.to_string()
    } else {
        format!("{message} [{}]", missing.join(", "))
    }
}

fn emit(level: Level, worker: Option<WorkerTag>, message: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_lines_do_not_repeat_what_the_message_says() {
        let tag = WorkerTag {
            slot: 2,
            generation: 3,
            pid: Some(nix::unistd::Pid::from_raw(4711)),
        };
        assert_eq!(
            with_missing_fields("worker 2 started (pid 4711, generation 3)", tag),
            "worker 2 started (pid 4711, generation 3)"
        );
        assert_eq!(
            with_missing_fields("worker 2 ready after 5ms", tag),
            "worker 2 ready after 5ms [generation 3, pid 4711]"
        );
        assert_eq!(
            with_missing_fields("draining", WorkerTag { pid: None, ..tag }),
            "draining [worker 2, generation 3]"
        );
    }

    #[test]
    fn a_broken_stderr_is_dropped_not_reported() {
        use std::io::Write;
        let (rd, wr) = nix::unistd::pipe().unwrap();
        drop(rd);
        let file: &'static std::fs::File = Box::leak(Box::new(std::fs::File::from(wr)));
        let before = DROPPED.load(Ordering::Relaxed);
        // EPIPE (Rust ignores SIGPIPE): swallowed and counted.
        assert_eq!(LossyStderr(Some(file)).write(b"line\n").unwrap(), 5);
        assert!(DROPPED.load(Ordering::Relaxed) > before);
    }
}
