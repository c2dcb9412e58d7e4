//! One error type for the whole program. Each variant carries the context a user needs to
//! fix the problem, and maps to a documented exit code (see README, "Exit codes").

use std::fmt;
use std::io;

/// Exit codes, documented in the README and `clusterctl --help`.
pub mod exit {
    /// Clean stop, or the requested operation succeeded.
    pub const OK: u8 = 0;
    /// A runtime failure: workers could not be started, a reload failed, an I/O error.
    pub const FAILURE: u8 = 1;
    /// The command line could not be parsed (clap's own code).
    pub const USAGE: u8 = 2;
    /// The supervisor to talk to is not running or its control socket is not reachable.
    pub const UNAVAILABLE: u8 = 69;
    /// The configuration can never work as given (bad value, bad LISTEN_FDS, unknown command):
    /// restarting will not help, so units list it in `RestartPreventExitStatus=`.
    pub const CONFIG: u8 = 78;
}

#[derive(Debug)]
pub enum Error {
    /// Invalid configuration; restarting will not help.
    Config(String),
    /// An OS call failed; `context` says what we were doing.
    Io { context: String, source: io::Error },
    /// A runtime failure with a reason (e.g. no worker ever became ready).
    Failed(String),
    /// The supervisor could not be reached.
    Unavailable(String),
    /// The command line does not say enough (e.g. which supervisor): exit 2, like clap's
    /// own usage errors.
    Usage(String),
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => exit::CONFIG,
            Error::Io { .. } | Error::Failed(_) => exit::FAILURE,
            Error::Unavailable(_) => exit::UNAVAILABLE,
            Error::Usage(_) => exit::USAGE,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) | Error::Failed(m) | Error::Unavailable(m) | Error::Usage(m) => {
                f.write_str(m)
            }
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Adds context to an `io::Result`, turning it into our `Error`.
pub trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|errno| Error::Io {
            context: context(),
            source: io::Error::from(errno),
        })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
