//! Every `unsafe` block and raw OS call of clusterctl lives here, each with a `// SAFETY:`
//! comment. The rest of the program uses the safe functions below.
//!
//! The centre piece is [`spawn`]: fork + execve done by hand, because a worker's environment
//! must contain `LISTEN_PID=<its own pid>`, which the parent cannot know before `fork`.
//! Everything the child needs (paths, argv, envp, a buffer for the pid digits) is allocated
//! before `fork`; between `fork` and `execve` the child only makes async-signal-safe system
//! calls and writes into memory it already owns. This keeps spawning correct even if some
//! library started a thread in the supervisor (fork copies only the calling thread, so any
//! lock held by another thread would stay locked forever in the child).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;
use nix::unistd::Pid;

/// A fully prepared worker command line: built (allocated) in the parent before `fork`.
#[derive(Debug)]
pub struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Environment entries as NUL-terminated byte buffers; those listed in `pid_slots`
    /// end in `=` followed by room for 20 digits and the NUL, patched with the child's pid.
    env: Vec<Vec<u8>>,
    pid_slots: Vec<(usize, usize)>,
    /// Number of listening sockets, which are at fds 3..3+n in the supervisor.
    listen_fds: RawFd,
    parent: libc::pid_t,
    devnull: RawFd,
    /// If set, becomes the worker's stdout and stderr (a journal stream of its own).
    output: Option<RawFd>,
    /// The soft `RLIMIT_NOFILE` the supervisor was started with, restored for the worker
    /// (see [`raise_nofile`]); `None` if it was not changed.
    nofile: Option<libc::rlimit>,
}

/// Room for the decimal digits of any pid, plus the NUL terminator.
const PID_ROOM: usize = 21;

impl ExecPlan {
    /// `env` entries are `KEY=VALUE`; every key in `pid_keys` gets the child's pid as value.
    pub fn new(
        path: &std::path::Path,
        argv: &[std::ffi::OsString],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        pid_keys: &[&str],
        listen_fds: usize,
        devnull: &OwnedFd,
        output: Option<&OwnedFd>,
    ) -> io::Result<ExecPlan> {
        use std::os::unix::ffi::OsStrExt;
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte")
            })
        };
        let path_c = cstr(path.as_os_str().as_bytes())?;
        let argv_c = argv
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());

        let mut bufs = Vec::with_capacity(env.len() + pid_keys.len());
        for (k, v) in env {
            let mut b = Vec::with_capacity(k.len() + v.len() + 2);
            b.extend_from_slice(k.as_bytes());
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            if b.contains(&0) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "environment contains a NUL byte",
                ));
            }
            b.push(0);
            bufs.push(b);
        }
        let mut pid_slots = Vec::new();
        for key in pid_keys {
            let mut b = Vec::with_capacity(key.len() + 1 + PID_ROOM);
            b.extend_from_slice(key.as_bytes());
            b.push(b'=');
            let start = b.len();
            b.resize(start + PID_ROOM, 0);
            pid_slots.push((bufs.len(), start));
            bufs.push(b);
        }
        Ok(ExecPlan {
            path: path_c,
            _argv: argv_c,
            argv_ptrs,
            env: bufs,
            pid_slots,
            listen_fds: RawFd::try_from(listen_fds).unwrap_or(RawFd::MAX - 3),
            parent: std::process::id().cast_signed(),
            devnull: devnull.as_raw_fd(),
            output: output.map(AsRawFd::as_raw_fd),
            nofile: ORIGINAL_NOFILE
                .get()
                .copied()
                .map(|(cur, max)| libc::rlimit {
                    rlim_cur: cur,
                    rlim_max: max,
                }),
        })
    }
}

/// Writes `n` in decimal into `buf` followed by a NUL. No allocation: safe after `fork`.
fn write_pid(buf: &mut [u8], n: libc::pid_t) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = u64::try_from(n).unwrap_or(0);
    loop {
        digits[len] = b'0' + u8::try_from(v % 10).unwrap_or(0);
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = 0;
}

/// A forked worker whose `execve` outcome is not known yet (see [`spawn_finish`]).
#[derive(Debug)]
pub struct Started {
    pid: Pid,
    /// Read end of the close-on-exec pipe: EOF once `execve` succeeded, or the errno.
    pipe: std::fs::File,
}

/// Forks a worker that executes `plan`. The outcome of its `execve` is collected by
/// [`spawn_finish`]: forking several workers before collecting lets their execs overlap
/// (each exec tears down a copy of the supervisor's address space, which is the slow part).
/// The plan is not needed after this returns: the child has its own copy.
///
/// In the child: own process group; stdout/stderr from `plan.output` if set; `PR_SET_PDEATHSIG(SIGKILL)` (checked against the parent
/// having already died); default dispositions and an empty signal mask; stdin from /dev/null;
/// fds 3..3+n inherited without `FD_CLOEXEC`, every other fd above 2 closed on exec.
pub fn spawn_start(plan: &mut ExecPlan) -> io::Result<Started> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut envp: Vec<*const libc::c_char> = Vec::with_capacity(plan.env.len() + 1);
    for b in &plan.env {
        envp.push(b.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let wr_fd = wr.as_raw_fd();

    // SAFETY: fork() is called with all memory the child needs already allocated. The child
    // branch below only calls async-signal-safe functions (setpgid, prctl, getppid,
    // sigaction, sigprocmask, fcntl, dup2, syscall(close_range), execve, write, _exit) and
    // writes into buffers it owns (its copy of `plan.env`), then either execs or _exits; it
    // never returns into Rust code that could allocate, lock or unwind.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see the comment on the fork above. The
        // pointers in argv_ptrs/envp point into memory that fork copied into this process.
        unsafe { child_after_fork(plan, envp.as_mut_ptr(), wr_fd) }
    }
    drop(wr);
    // Also set the group from the parent side, so that a signal to the group sent right
    // after spawn_start() returns cannot miss (the child does the same; whoever is first
    // wins).
    let _ = nix::unistd::setpgid(Pid::from_raw(pid), Pid::from_raw(pid));
    Ok(Started {
        pid: Pid::from_raw(pid),
        pipe: std::fs::File::from(rd),
    })
}

impl Started {
    pub fn pid(&self) -> Pid {
        self.pid
    }
}

/// Waits until the started worker has executed its program (or failed to): its pid, or
/// the OS error of the failed `execve` (reported through the close-on-exec pipe, as std's
/// `Command` does; the failed child is reaped here).
pub fn spawn_finish(started: Started) -> io::Result<Pid> {
    let Started { pid, pipe: file } = started;
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match io::Read::read(&mut &file, &mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // execve failed: reap the child, which has _exit()ed.
    let _ = nix::sys::wait::waitpid(pid, None);
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
}

/// The child's side of [`spawn`]. Never returns.
///
/// # Safety
/// Must only be called in the child right after `fork`, with `envp` a NULL-terminated array
/// of pointers into `plan.env`.
unsafe fn child_after_fork(
    plan: &mut ExecPlan,
    envp: *mut *const libc::c_char,
    err_fd: RawFd,
) -> ! {
    // SAFETY: every call below is async-signal-safe and operates on memory owned by this
    // (single-threaded) child process; see `spawn`. (setrlimit is a plain system call.)
    unsafe {
        let fail = |err_fd: RawFd| -> ! {
            let e = *libc::__errno_location();
            let bytes = e.to_ne_bytes();
            libc::write(err_fd, bytes.as_ptr().cast(), 4);
            libc::_exit(127)
        };
        let me = libc::getpid();
        for &(idx, start) in &plan.pid_slots {
            let buf = &mut plan.env[idx];
            write_pid(&mut buf[start..], me);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(err_fd);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            fail(err_fd);
        }
        // The supervisor may have died between fork and prctl: then nobody would kill us.
        if libc::getppid() != plan.parent {
            libc::_exit(1);
        }
        // Default dispositions for every signal (an ignored signal stays ignored across
        // execve, and Rust's runtime ignores SIGPIPE), then an empty mask (the supervisor
        // blocks the signals it reads through signalfd).
        // rt_sigaction directly: glibc refuses signals 32 and 33 (its own), but an ignored
        // disposition for them would be inherited too. A zeroed kernel `struct sigaction`
        // is SIG_DFL with no flags and an empty mask.
        let dfl = [0u64; 4];
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const empty, std::ptr::null_mut());

        // The supervisor raised its soft fd limit; programs expect the usual one (select()
        // breaks above 1024).
        if let Some(lim) = &plan.nofile
            && libc::setrlimit(libc::RLIMIT_NOFILE, lim) != 0
        {
            fail(err_fd);
        }
        if libc::dup2(plan.devnull, 0) < 0 {
            fail(err_fd);
        }
        if let Some(out) = plan.output
            && (libc::dup2(out, 1) < 0 || libc::dup2(out, 2) < 0)
        {
            fail(err_fd);
        }
        // The listening sockets already sit at 3..3+n; dup2(fd, fd) would be a no-op, so
        // clear FD_CLOEXEC explicitly.
        for fd in 3..3 + plan.listen_fds {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                fail(err_fd);
            }
        }
        // Everything else above the sockets is closed on exec (this includes err_fd, which
        // must stay open until execve succeeds).
        let first = libc::c_uint::try_from(3 + plan.listen_fds).unwrap_or(libc::c_uint::MAX);
        let r = libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if r != 0 {
            // Kernels before 5.11: mark them one by one.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
                libc::c_int::try_from(lim.rlim_cur.min(1 << 20)).unwrap_or(1 << 20)
            } else {
                65536
            };
            for fd in 3 + plan.listen_fds..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        libc::execve(
            plan.path.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            envp.cast_const(),
        );
        fail(err_fd)
    }
}

/// Moves the given sockets to fds 3, 4, … (close-on-exec in the supervisor; the worker
/// spawn clears the flag in the child). Whatever sat at those numbers is replaced.
pub fn place_at_3(fds: Vec<OwnedFd>) -> io::Result<()> {
    let n = RawFd::try_from(fds.len()).map_err(|_| io::Error::other("too many sockets"))?;
    // First move all of them above the target range, so that no target number is still
    // in use by one of our own sockets when we dup onto it.
    let mut high = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: F_DUPFD_CLOEXEC on a valid, owned fd returns a new fd or -1.
        let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3 + n) };
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
        high.push(unsafe { OwnedFd::from_raw_fd(new) });
    }
    for (i, fd) in (3..).zip(high) {
        // SAFETY: dup3 onto target number `i` atomically replaces whatever was there; the
        // new fd at `i` is intentionally not owned by any Rust object: it lives as long as
        // the process (the supervisor's listening socket).
        if unsafe { libc::dup3(fd.as_raw_fd(), i, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Marks inherited fds 3..3+n close-on-exec and checks that each is a listening socket.
pub fn adopt_inherited(n: usize) -> io::Result<()> {
    let n = RawFd::try_from(n).map_err(|_| io::Error::other("too many sockets"))?;
    for fd in 3..3 + n {
        // SAFETY: the fd numbers were passed to us by the service manager (LISTEN_FDS); we
        // only borrow them for fcntl/fstat/getsockopt and never close them.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        set_cloexec(b)?;
        let st = nix::sys::stat::fstat(b)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(io::Error::other(format!("fd {fd} is not a socket")));
        }
        if !nix::sys::socket::getsockopt(&b, nix::sys::socket::sockopt::AcceptConn)? {
            return Err(io::Error::other(format!(
                "fd {fd} is not a listening socket (datagram and Accept=yes sockets are not supported)"
            )));
        }
    }
    Ok(())
}

/// Borrows listening socket number `i` (fd 3+i), which lives for the whole process.
pub fn listen_fd(i: usize) -> BorrowedFd<'static> {
    let fd = 3 + RawFd::try_from(i).expect("socket index");
    // SAFETY: fds 3..3+n are the process-lifetime listening sockets placed by `place_at_3`
    // or adopted by `adopt_inherited`; nothing closes them.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Sets or clears `FD_CLOEXEC` on `fd` (the upgrade keeps exactly the fds it hands over
/// open across `execve`, and restores the flag if the exec fails).
pub fn set_inherit(fd: RawFd, inherit: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    // SAFETY: borrowed only for this fcntl call; the caller names an fd it owns and keeps
    // open (a closed fd makes fcntl fail with EBADF, nothing worse).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = if inherit {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Takes ownership of an fd handed over by the previous image (`clusterctl upgrade`),
/// after checking it is open; it is made close-on-exec again.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::other(format!("fd {fd} is a standard stream")));
    }
    set_inherit(fd, false).map_err(|e| io::Error::other(format!("fd {fd}: {e}")))?;
    // SAFETY: the fd is open (fcntl above succeeded) and was handed to this image by the
    // previous one, which owned it; `handover::decode` rejects a snapshot naming an fd
    // twice, so nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A memory file for the hand-over snapshot (`memfd_create`, close-on-exec until the
/// upgrade clears the flag).
pub fn memfd(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    Ok(nix::sys::memfd::memfd_create(
        name,
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )?)
}

/// Replaces this process image (same pid) with `path`, keeping the environment. Only
/// returns on failure. Other threads end with the exec.
pub fn exec(path: &std::path::Path, argv: &[std::ffi::OsString]) -> io::Error {
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &std::ffi::OsStr| CString::new(s.as_bytes());
    let Ok(path) = c(path.as_os_str()) else {
        return io::Error::other("the binary's path contains a NUL byte");
    };
    let Ok(argv) = argv.iter().map(|a| c(a)).collect::<Result<Vec<_>, _>>() else {
        return io::Error::other("an argument contains a NUL byte");
    };
    match nix::unistd::execv(&path, &argv) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// Is `pid` still a child of ours (running, or a zombie not reaped yet)?
pub fn is_child(pid: Pid) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    waitid(Id::Pid(pid), flags) != Err(nix::Error::ECHILD)
}

/// Makes this process a child subreaper: orphaned descendants of workers are reparented to
/// the supervisor (and reaped) instead of init.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes a plain integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens /dev/null on any of fds 0, 1, 2 that is closed (`clusterctl run … 2>&-`), so
/// that no socket or file opened later lands there and receives log lines or a worker's
/// output by mistake.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor flags of a number; no memory involved.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        // SAFETY: open() of a constant NUL-terminated path; the result is checked.
        let new = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if new >= 0 && new != fd {
            // SAFETY: dup2 onto a number we found closed, then close our temporary fd.
            unsafe {
                libc::dup2(new, fd);
                libc::close(new);
            }
        }
    }
}

/// The `RLIMIT_NOFILE` (soft, hard) the process started with, once [`raise_nofile`] raised
/// the soft limit.
static ORIGINAL_NOFILE: std::sync::OnceLock<(libc::rlim_t, libc::rlim_t)> =
    std::sync::OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd's default soft limit of 1024
/// is meant for select() users; the supervisor holds one fd per control client). Workers get
/// the original soft limit back before exec. Returns (old soft, new soft).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        let _ = ORIGINAL_NOFILE.set((soft, hard));
    }
    Ok((soft, hard.max(soft)))
}

/// The current soft `RLIMIT_NOFILE`.
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// The guardian: a tiny child process that outlives a SIGKILLed supervisor just long enough
/// to SIGKILL the process groups of its workers (with everything the workers started in
/// them), then exits. It learns the groups through a pipe (4-byte messages: `+pgid` when a
/// worker starts, `-pgid` once it is reaped) and notices the supervisor's death as EOF on
/// that pipe: the supervisor holds the only write end (close-on-exec, so workers never get
/// it). It blocks every signal but SIGKILL, sits in its own process group, and keeps no fd
/// but the pipe's read end (stdio is /dev/null): it holds no socket, port or terminal.
#[derive(Debug)]
pub struct Guardian {
    pid: Pid,
    pipe: std::fs::File,
    /// A message could not be written (the guardian is gone or not reading).
    pub broken: bool,
}

/// Worker groups the guardian can track at once (two full generations of the largest
/// pool, during a reload).
const GUARDED: usize = 2 * 4096 + 64;

impl Guardian {
    /// Forks the guardian. Call from the main thread; the child only makes async-signal-safe
    /// calls on memory allocated before the fork.
    pub fn start() -> io::Result<Guardian> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut groups: Vec<libc::pid_t> = Vec::with_capacity(GUARDED);
        let mut buf = [0u8; 4096];
        let rd_fd = rd.as_raw_fd();
        // SAFETY: fork() with everything the child uses (groups, buf) allocated before; the
        // child calls `guardian_main`, which only makes async-signal-safe calls, and never
        // returns into Rust code that could allocate, lock or unwind.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child; see above.
            unsafe { guardian_main(rd_fd, &mut groups, &mut buf) }
        }
        drop(rd);
        let pipe = std::fs::File::from(wr);
        // SAFETY: F_SETFL on the pipe's write end we own.
        unsafe {
            let fl = libc::fcntl(pipe.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Guardian {
            pid: Pid::from_raw(pid),
            pipe,
            broken: false,
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The write end of its pipe (kept open across `clusterctl upgrade`'s exec, so the
    /// guardian never sees EOF).
    pub fn pipe_fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// The guardian of the previous image (`clusterctl upgrade`): its pid and pipe.
    pub fn adopt(pid: Pid, pipe: OwnedFd) -> Guardian {
        Guardian {
            pid,
            pipe: std::fs::File::from(pipe),
            broken: false,
        }
    }

    /// Tells the guardian about a worker's process group (`add`) or that it is gone.
    pub fn track(&mut self, pgid: Pid, add: bool) {
        let v = if add { pgid.as_raw() } else { -pgid.as_raw() };
        // A 4-byte write to a pipe is atomic; never blocks (O_NONBLOCK).
        match io::Write::write(&mut &self.pipe, &v.to_ne_bytes()) {
            Ok(4) => {}
            _ => self.broken = true,
        }
    }
}

/// The guardian's whole life. Never returns.
///
/// # Safety
/// Only in the child right after `fork`; `groups` and `buf` are this process's own copies.
unsafe fn guardian_main(rd: RawFd, groups: &mut Vec<libc::pid_t>, buf: &mut [u8; 4096]) -> ! {
    // SAFETY: async-signal-safe calls only (sigprocmask, setpgid, prctl, open, dup2, close_range,
    // close, read, kill, _exit); `groups` never grows past the capacity allocated before
    // the fork, so push never allocates.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&raw mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const all, std::ptr::null_mut());
        libc::setpgid(0, 0);
        // Shown by ps/top, so that operators know what the second process is.
        libc::prctl(libc::PR_SET_NAME, c"cluster-guard".as_ptr());
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                if fd != rd {
                    libc::dup2(null, fd);
                }
            }
        }
        // Every other fd goes: listening sockets, the control socket, the journal.
        let max = libc::c_uint::MAX;
        let rd_u = libc::c_uint::try_from(rd).unwrap_or(3);
        if (rd_u > 3 && libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, rd_u - 1, 0) != 0)
            || libc::syscall(libc::SYS_close_range, rd_u + 1, max, 0) != 0
        {
            for fd in 3..65536 {
                if fd != rd {
                    libc::close(fd);
                }
            }
        }
        let mut have = 0usize;
        loop {
            let n = libc::read(rd, buf.as_mut_ptr().add(have).cast(), buf.len() - have);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            have += usize::try_from(n).unwrap_or(0);
            let whole = have - have % 4;
            for chunk in buf[..whole].chunks_exact(4) {
                let v = libc::pid_t::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                if v > 0 {
                    if groups.len() < groups.capacity() {
                        groups.push(v);
                    }
                } else if let Some(i) = groups.iter().position(|g| *g == -v) {
                    groups.swap_remove(i);
                }
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }
        for g in groups.iter() {
            libc::kill(-*g, libc::SIGKILL);
        }
        libc::_exit(0)
    }
}

/// A file descriptor that refers to process `pid` itself, not to its number: signals sent
/// through it can never reach a process that reused the pid, and it turns readable when the
/// process exits (pollable). `ENOSYS` before Linux 5.3.
pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and a flags word (0) and returns a new fd or -1;
    // it reads or writes no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us, open and owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process `pidfd` refers to (`ESRCH` once it has exited, even if
/// its pid was reused).
pub fn pidfd_send_signal(
    pidfd: BorrowedFd<'_>,
    signal: nix::sys::signal::Signal,
) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a valid fd (borrowed for the call), a signal
    // number, a null siginfo (the kernel fills in a default one, as for kill(2)) and flags
    // 0; no memory of ours is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_signals_the_child_and_turns_readable_when_it_exits() {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use nix::sys::signal::Signal;
        use std::os::fd::AsFd;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let fd = match pidfd_open(pid) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                child.kill().unwrap();
                child.wait().unwrap();
                assert!(
                    std::env::var_os("CI").is_none(),
                    "pidfd_open: {e} (kernel < 5.3?)"
                );
                eprintln!("skipped: no pidfd_open on this kernel");
                return;
            }
            r => r.unwrap(),
        };
        let readable = |ms: u16| {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(ms)).unwrap() == 1
        };
        assert!(!readable(0), "readable while the child runs");
        pidfd_send_signal(fd.as_fd(), Signal::SIGTERM).unwrap();
        assert!(readable(10_000), "not readable after the child exited");
        // Exited but not reaped yet: the pid is still ours; signalling it is an error now.
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        let e = pidfd_send_signal(fd.as_fd(), Signal::SIGKILL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        assert!(pidfd_open(Pid::from_raw(-1)).is_err());
    }

    #[test]
    fn pid_digits() {
        let mut buf = [0xffu8; PID_ROOM];
        write_pid(&mut buf, 4_194_304);
        assert_eq!(&buf[..8], b"4194304\0");
        write_pid(&mut buf, 7);
        assert_eq!(&buf[..2], b"7\0");
    }
}
