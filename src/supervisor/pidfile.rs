//! `--pidfile`: the supervisor's pid in a file, for tools that want one.

use std::path::{Path, PathBuf};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::error::{Context, Error, Result};

/// `--pidfile`: created exclusively; a stale one (its pid is dead) is replaced; removed on
/// drop.
#[derive(Debug)]
pub(super) struct Pidfile(PathBuf);

impl Pidfile {
    /// The pidfile this pid wrote before `clusterctl upgrade` re-executed it.
    pub(super) fn adopt(path: PathBuf) -> Pidfile {
        Pidfile(path)
    }

    pub(super) fn create(path: &Path) -> Result<Pidfile> {
        use std::io::Write;
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id())
                        .context(|| format!("cannot write pidfile {}", path.display()))?;
                    return Ok(Pidfile(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    if text.trim().is_empty() {
                        return Err(Error::config(format!(
                            "pidfile {} exists but is empty: another supervisor may be starting; \
                             remove it if none is",
                            path.display()
                        )));
                    }
                    let alive = text
                        .trim()
                        .parse::<i32>()
                        .ok()
                        .filter(|p| *p > 0)
                        .is_some_and(|p| {
                            // Our own pid in a leftover file (a container restarted us with
                            // the same pid) is stale too.
                            p != std::process::id().cast_signed()
                                && kill(Pid::from_raw(p), None) != Err(nix::Error::ESRCH)
                        });
                    if alive {
                        return Err(Error::config(format!(
                            "pidfile {} names pid {}, which is running: is another supervisor using it?",
                            path.display(),
                            text.trim()
                        )));
                    }
                    tracing::warn!(
                        "replacing stale pidfile {} (pid {:?} is gone)",
                        path.display(),
                        text.trim()
                    );
                    let _ = std::fs::remove_file(path);
                }
                Err(e) => {
                    return Err(e).context(|| format!("cannot create pidfile {}", path.display()));
                }
            }
        }
        Err(Error::Failed(format!(
            "cannot create pidfile {}: it keeps reappearing",
            path.display()
        )))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
