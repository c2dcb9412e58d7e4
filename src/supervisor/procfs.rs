//! The one reader of `/proc` for processes: `/proc/PID/stat` (parent, CPU time, resident
//! pages), `/proc/PID/statm` and `/proc/PID/task/TID/children`. Used to attribute notify
//! datagrams to workers (parent chain), for `--max-worker-memory` (memory.rs) and for the
//! status report (status.rs).

/// The fields of `/proc/PID/stat` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: i32,
    /// CPU time in clock ticks (user, system).
    pub utime: u64,
    pub stime: u64,
    /// Resident pages.
    pub rss_pages: u64,
}

/// Parses the contents of `/proc/PID/stat`: "pid (comm) state ppid ...", where comm may
/// contain spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After "(comm)": state is field 3; ppid 4, utime 14, stime 15, rss 24 (1-based).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        utime: num(14).unwrap_or(0),
        stime: num(15).unwrap_or(0),
        rss_pages: num(24).unwrap_or(0),
    })
}

/// `/proc/PID/stat` of `pid`; `None` when it is gone (or unreadable).
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The second field of `/proc/PID/statm`: resident pages.
pub fn resident_pages(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The children of every thread of `pid` (needs CONFIG_PROC_CHILDREN; none without).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Every process id in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// Bytes per page.
pub fn page_size() -> u64 {
    sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096)
}

/// Clock ticks per second (the unit of `Stat::utime`).
pub fn clock_ticks() -> u64 {
    sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100)
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<u64> {
    nix::unistd::sysconf(var)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_an_odd_command_name() {
        let text = "1234 (my (odd) prog) S 77 1200 1200 0 -1 4194560 100 0 0 0 \
                    15 7 0 0 20 0 1 0 100 1000000 321 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(
            s,
            Stat {
                ppid: 77,
                utime: 15,
                stime: 7,
                rss_pages: 321
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = i32::try_from(std::process::id()).unwrap();
        let s = stat(me).unwrap();
        assert_eq!(s.ppid, nix::unistd::getppid().as_raw());
        assert!(s.rss_pages > 0);
        assert!(resident_pages(me).unwrap() > 0);
        assert!(all_pids().contains(&me));
    }
}
