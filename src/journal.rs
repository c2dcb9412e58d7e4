//! Per-worker log streams. When the supervisor's stderr is the journal, each worker gets
//! its own stream connection to journald (the protocol systemd uses for a service's
//! stdout), with `SYSLOG_IDENTIFIER=APP/SLOT`: `journalctl -u APP -t APP/2` shows worker 2's
//! own output. The worker writes straight to journald; the supervisor is not in the data
//! path, so a stalled or restarting supervisor cannot block or kill a worker's logging.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

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

/// Opens a journal stream for one worker. `None` if journald is not reachable, or not at
/// once (the worker then inherits the supervisor's stdout/stderr): the connect and the
/// header write never wait, so a stalled journald cannot stall the event loop.
pub fn stream_for(identifier: &str, slot: u32) -> Option<OwnedFd> {
    stream_at(Path::new(STDOUT_SOCKET), identifier, slot)
}

fn stream_at(socket_path: &Path, identifier: &str, slot: u32) -> Option<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .ok()?;
    // A unix stream connect completes at once or fails (EAGAIN: backlog full).
    connect(fd.as_raw_fd(), &UnixAddr::new(socket_path).ok()?).ok()?;
    let mut s = UnixStream::from(fd);
    let _ = s.shutdown(std::net::Shutdown::Read);
    // identifier, unit id, priority (info), level prefix (<N> allowed), forward to syslog,
    // kmsg, console. A fresh connection's buffer takes it whole, or we give up.
    let header = format!("{identifier}/{slot}\n\n6\n1\n0\n0\n0\n");
    match s.write(header.as_bytes()) {
        Ok(n) if n == header.len() => {}
        _ => return None,
    }
    // The worker's stdout must block as usual (O_NONBLOCK is shared with it).
    s.set_nonblocking(false).ok()?;
    Some(s.into())
}

/// `DEV:INODE` of a stream, as systemd puts in `JOURNAL_STREAM`.
pub fn stream_id(fd: &OwnedFd) -> Option<String> {
    let st = nix::sys::stat::fstat(fd).ok()?;
    Some(format!("{}:{}", st.st_dev, st.st_ino))
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

    #[test]
    fn stream_connect_never_waits_and_the_worker_end_blocks() {
        let dir = std::env::temp_dir().join(format!("clusterctl-jstream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stdout");
        assert!(stream_at(&path, "x", 0).is_none(), "nobody listening");
        let listener = {
            use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
            let fd = nix::sys::socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            nix::sys::socket::bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
            nix::sys::socket::listen(&fd, Backlog::new(1).unwrap()).unwrap();
            std::os::unix::net::UnixListener::from(fd)
        };
        let fd = stream_at(&path, "app", 3).expect("stream");
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(
            flags & nix::libc::O_NONBLOCK,
            0,
            "the worker's stdout blocks"
        );
        let st = nix::sys::stat::fstat(&fd).unwrap();
        assert_eq!(
            stream_id(&fd).unwrap(),
            format!("{}:{}", st.st_dev, st.st_ino)
        );
        let (mut peer, _) = listener.accept().unwrap();
        let mut head = [0u8; 6];
        std::io::Read::read_exact(&mut peer, &mut head).unwrap();
        assert_eq!(&head, b"app/3\n");
        // A listener whose backlog is full: the connect fails at once instead of waiting.
        let mut streams = Vec::new();
        let started = std::time::Instant::now();
        let mut refused = false;
        for _ in 0..1000 {
            if let Some(s) = stream_at(&path, "app", 4) {
                streams.push(s);
            } else {
                refused = true;
                break;
            }
        }
        assert!(refused, "a full backlog refuses the stream");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        drop(streams);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
