//! Per-worker log streams. When the supervisor's stderr is the journal, each worker gets
//! its own stream connection to journald (the protocol systemd uses for a service's
//! stdout), with `SYSLOG_IDENTIFIER=APP/SLOT`: `journalctl -u APP -t APP/2` shows worker 2's
//! own output. The worker writes straight to journald; the supervisor is not in the data
//! path, so a stalled or restarting supervisor cannot block or kill a worker's logging.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

const STDOUT_SOCKET: &str = "/run/systemd/journal/stdout";

/// The name used for identifiers: the systemd unit we run in (from `/proc/self/cgroup`,
/// without `.service`), else the worker program's file name.
pub fn base_identifier(program: &std::path::Path) -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| unit_from_cgroup(&c))
        .unwrap_or_else(|| {
            program
                .file_name()
                .map_or_else(|| "worker".into(), |f| f.to_string_lossy().into_owned())
        })
}

/// The service unit name from `/proc/self/cgroup` content, without `.service`.
fn unit_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        path.split('/')
            .rev()
            .find_map(|c| c.strip_suffix(".service"))
            .filter(|u| !u.is_empty())
            .map(str::to_string)
    })
}

/// Opens a journal stream for one worker. `None` if journald is not reachable (the worker
/// then inherits the supervisor's stdout/stderr).
pub fn stream_for(identifier: &str, slot: u32) -> Option<OwnedFd> {
    let mut s = UnixStream::connect(STDOUT_SOCKET).ok()?;
    let _ = s.shutdown(std::net::Shutdown::Read);
    // identifier, unit id, priority (info), level prefix (<N> allowed), forward to syslog,
    // kmsg, console.
    let header = format!("{identifier}/{slot}\n\n6\n1\n0\n0\n0\n");
    s.write_all(header.as_bytes()).ok()?;
    Some(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_name_from_cgroup() {
        let v2 = "0::/system.slice/myapp.service\n";
        assert_eq!(unit_from_cgroup(v2).as_deref(), Some("myapp"));
        let v1 = "12:pids:/system.slice/web.service\n1:name=systemd:/system.slice/web.service\n";
        assert_eq!(unit_from_cgroup(v1).as_deref(), Some("web"));
        assert_eq!(unit_from_cgroup("0::/user.slice/session-2.scope\n"), None);
    }
}
