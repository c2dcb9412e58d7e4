//! Resident memory of a worker and its descendants, for `--max-worker-memory`.
//!
//! Cheap enough to run every few seconds: `/proc/PID/statm` of the worker, and of each
//! descendant found through `/proc/PID/task/TID/children` (no scan of all of `/proc`).

use std::collections::HashSet;

use super::procfs::{self, children, resident_pages as rss_pages};

/// At most this many processes are counted per worker (a fork bomb must not make the
/// sample slow).
const MAX_PROCESSES: usize = 256;

/// The resident memory in bytes of `pid` and its descendants; `None` when `pid` itself
/// cannot be read (it is gone).
pub fn tree_rss(pid: i32) -> Option<u64> {
    let page = procfs::page_size();
    let mut total = rss_pages(pid)? * page;
    let mut seen = HashSet::from([pid]);
    let mut todo = children(pid);
    while let Some(p) = todo.pop() {
        if seen.len() >= MAX_PROCESSES || !seen.insert(p) {
            continue;
        }
        if let Some(pages) = rss_pages(p) {
            total += pages * page;
            todo.extend(children(p));
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn counts_a_process_and_its_descendants() {
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = i32::try_from(sh.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let kids = loop {
            let kids = children(pid);
            // Both children forked and exec'd `sleep` (statm readable, comm changed).
            let execd = |k: &i32| {
                std::fs::read_to_string(format!("/proc/{k}/comm")).is_ok_and(|c| c == "sleep\n")
            };
            if kids.len() == 2 && kids.iter().all(execd) {
                break kids;
            }
            assert!(Instant::now() < deadline, "children of sh: {kids:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        let page = u64::try_from(
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        // A freshly exec'd `sleep` still faults pages in, so its RSS can grow between two
        // reads (CI saw 5132288 vs 5103616). Stop the three processes, then compare only
        // when the individual reads taken before and after `tree_rss` agree.
        for p in std::iter::once(pid).chain(kids.iter().copied()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        let read = || -> (u64, Vec<u64>) {
            let own = rss_pages(pid).unwrap();
            (own, kids.iter().map(|k| rss_pages(*k).unwrap()).collect())
        };
        let (own, each, tree, first) = loop {
            let before = read();
            let tree = tree_rss(pid);
            let first = tree_rss(kids[0]);
            if read() == before {
                break (before.0, before.1, tree, first);
            }
            assert!(
                Instant::now() < deadline,
                "RSS of sh and its children never settled"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(own > 0 && each.iter().all(|p| *p > 0));
        assert_eq!(tree, Some((own + each.iter().sum::<u64>()) * page));
        assert_eq!(first, Some(each[0] * page));
        for k in kids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        sh.kill().unwrap();
        sh.wait().unwrap();
        assert_eq!(tree_rss(-5), None);
    }
}
