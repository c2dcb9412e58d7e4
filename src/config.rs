//! Value types for the command line: each one parses and validates a single option
//! (`FromStr`), so clap rejects bad input with a precise message before anything runs.
//! `gen-units` and `run` share these types, so both spell and validate options the same way.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A duration as written on the command line: `250ms`, `30s`, `2m`, `1h`, `1m30s`, `1.5s`.
/// A bare number means seconds, as in systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration (examples: 500ms, 30s, 2m, 1m30s)".into());
        }
        if let Ok(secs) = s.parse::<f64>() {
            return secs_to_dur(secs, s);
        }
        let mut total = Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("invalid duration {s:?}: missing unit after number"))?;
            if num_end == 0 {
                return Err(format!(
                    "invalid duration {s:?}: expected a number (examples: 500ms, 30s, 2m)"
                ));
            }
            let value: f64 = rest[..num_end].parse().map_err(|_| {
                format!("invalid duration {s:?}: bad number {:?}", &rest[..num_end])
            })?;
            let after = &rest[num_end..];
            let unit_end = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let scale = match after[..unit_end].trim() {
                "us" | "usec" => 1e-6,
                "ms" | "msec" => 1e-3,
                "s" | "sec" | "second" | "seconds" => 1.0,
                "m" | "min" | "minute" | "minutes" => 60.0,
                "h" | "hr" | "hour" | "hours" => 3600.0,
                "d" | "day" | "days" => 86400.0,
                other => {
                    return Err(format!(
                        "invalid duration {s:?}: unknown unit {other:?} (use us, ms, s, m, h or d)"
                    ));
                }
            };
            total += secs_to_dur(value * scale, s)?.0;
            rest = &after[unit_end..];
        }
        Ok(Dur(total))
    }
}

fn secs_to_dur(secs: f64, orig: &str) -> Result<Dur, String> {
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration {orig:?}: out of range"));
    }
    Ok(Dur(Duration::from_secs_f64(secs)))
}

impl fmt::Display for Dur {
    /// Renders in the most compact exact unit, in a form both clusterctl and systemd accept.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        if us == 0 {
            f.write_str("0")
        } else if us.is_multiple_of(3_600_000_000) {
            write!(f, "{}h", us / 3_600_000_000)
        } else if us.is_multiple_of(60_000_000) {
            write!(f, "{}min", us / 60_000_000)
        } else if us.is_multiple_of(1_000_000) {
            write!(f, "{}s", us / 1_000_000)
        } else if us.is_multiple_of(1000) {
            write!(f, "{}ms", us / 1000)
        } else {
            write!(f, "{us}us")
        }
    }
}

/// Where a listening socket comes from when clusterctl binds it itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `PORT` (all addresses, dual stack), `HOST:PORT`, `[V6]:PORT`.
    Tcp(std::net::SocketAddr),
    /// `unix:/path.sock`
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `--listen [NAME=]ADDRESS`: `8080`, `127.0.0.1:8080`, `[::1]:8080`, `unix:/run/app.sock`,
/// optionally named: `web=127.0.0.1:8080`. A bare port listens on all IPv4 and IPv6 addresses
/// (`[::]:PORT`, dual stack), as systemd's `ListenStream=PORT` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name passed to workers in `LISTEN_FDNAMES`, if one was given.
    pub name: Option<String>,
    pub address: Address,
    /// The text the user wrote after `NAME=`, kept for rendering `ListenStream=`.
    pub raw: String,
}

impl ListenSpec {
    /// The name workers see for this socket: the given name, or `default`.
    pub fn name_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.name.as_deref().unwrap_or(default)
    }

    /// The warning for a TCP address on every interface (`0.0.0.0`, `[::]`, a bare port),
    /// shared by `run --listen` and `gen-units --listen`; `None` for a specific address.
    pub fn every_interface_warning(&self) -> Option<String> {
        let Address::Tcp(a) = &self.address else {
            return None;
        };
        a.ip().is_unspecified().then(|| {
            format!(
                "--listen {} listens on every interface{}: reachable from other machines; \
                 use --listen 127.0.0.1:{} for this machine only",
                self.raw,
                if a.is_ipv6() { " (IPv4 and IPv6)" } else { "" },
                a.port()
            )
        })
    }

    /// The `ListenStream=` value for a socket unit.
    pub fn listen_stream(&self) -> String {
        match &self.address {
            Address::Unix(p) => p.display().to_string(),
            Address::Tcp(_) => self.raw.clone(),
        }
    }
}

/// Validates an `LISTEN_FDNAMES` / `FileDescriptorName=` name: 1–255 printable ASCII
/// characters, no colon (the separator), no whitespace.
pub fn validate_fd_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!("socket name {name:?} must be 1 to 255 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || *c == ':' || *c == '%' || *c == '\\')
    {
        return Err(format!(
            "socket name {name:?} contains {c:?}; use letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = match s.split_once('=') {
            Some((n, r)) => {
                validate_fd_name(n)?;
                (Some(n.to_string()), r)
            }
            None => (None, s),
        };
        let address = parse_address(rest)?;
        Ok(ListenSpec {
            name,
            address,
            raw: rest.to_string(),
        })
    }
}

fn parse_address(s: &str) -> Result<Address, String> {
    const HINT: &str = "expected PORT, HOST:PORT, [IPV6]:PORT or unix:/PATH";
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("unix socket path {path:?} must be absolute"));
        }
        if path.len() >= 108 {
            return Err(format!(
                "unix socket path {path:?} is too long (at most 107 bytes)"
            ));
        }
        if path.chars().any(char::is_control) {
            return Err(format!(
                "unix socket path {path:?} contains a control character"
            ));
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
        let port: u16 = s
            .parse()
            .map_err(|_| format!("invalid listen address {s:?}: port out of range 1..65535"))?;
        if port == 0 {
            return Err("port 0 is not allowed: choose a fixed port".into());
        }
        return Ok(Address::Tcp(std::net::SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            port,
        ))));
    }
    let (host, port, bracketed) =
        split_host_port(s).ok_or_else(|| format!("invalid listen address {s:?}: {HINT}"))?;
    let port: u16 = match port.parse::<u32>() {
        Ok(0) => return Err("port 0 is not allowed: choose a fixed port".into()),
        Ok(p) if p <= 65535 => u16::try_from(p).unwrap_or(u16::MAX),
        _ => {
            return Err(format!(
                "invalid listen address {s:?}: port {port:?} out of range 1..65535"
            ));
        }
    };
    let ip: std::net::IpAddr = host.parse().map_err(|_| {
        format!(
            "invalid listen address {s:?}: HOST must be an IP address (127.0.0.1, 0.0.0.0, \
             [::1], [::]); host names are not resolved. For every interface give just the port"
        )
    })?;
    if bracketed != ip.is_ipv6() {
        return Err(format!(
            "invalid listen address {s:?}: an IPv6 address goes in brackets ([::1]:{port}), \
             an IPv4 address does not"
        ));
    }
    Ok(Address::Tcp(std::net::SocketAddr::new(ip, port)))
}

/// `HOST:PORT` or `[V6]:PORT` split at the port's colon: (host without brackets, port,
/// whether it was bracketed).
fn split_host_port(s: &str) -> Option<(&str, &str, bool)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return Some((host, after.strip_prefix(':')?, true));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        // An IPv6 address without brackets: the port cannot be told apart.
        return None;
    }
    Some((host, port, false))
}

/// The same address given twice to `--listen` (run and gen-units): refused, because both
/// cannot be bound (run) or would be one socket (a socket unit).
pub fn check_listen_unique(listen: &[ListenSpec]) -> Result<(), String> {
    for (i, l) in listen.iter().enumerate() {
        if let Some(first) = listen[..i].iter().find(|o| o.address == l.address) {
            return Err(format!(
                "--listen {} is listed twice (as {:?} and {:?}): give each address once",
                l.address, first.raw, l.raw
            ));
        }
    }
    Ok(())
}

/// The longest `sun_path` a unix socket may have, without the trailing NUL.
pub const SUN_PATH_MAX: usize = 107;

/// The name of the supervisor's notify socket in its runtime directory, at the longest a
/// pid can make it (pid_max is at most 2^22 = 4194304). Keep in sync with `notify.rs`.
pub const NOTIFY_SOCKET_NAME_MAX: &str = "notify.4194304.sock";

/// The first directory of `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`), where the
/// supervisor binds its notify socket and, by default, its control socket.
pub fn runtime_directory() -> Option<PathBuf> {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = dir.to_str()?.split(':').next()?.to_string();
    Some(PathBuf::from(first))
}

/// Checks that the unix socket paths the supervisor will bind fit in `sun_path`: the
/// control socket and, in `runtime_dir` (`$RUNTIME_DIRECTORY`), the notify socket. Used at
/// `run` start (before anything is bound) and, for the unit's paths, by gen-units.
pub fn check_socket_paths(
    control: Option<&std::path::Path>,
    runtime_dir: Option<&std::path::Path>,
) -> Result<(), String> {
    let too_long = |what: &str, path: String| {
        format!(
            "{what} {path} is {} bytes, more than the {SUN_PATH_MAX} a unix socket path may \
             have: use a shorter name or directory",
            path.len()
        )
    };
    if let Some(c) = control {
        let text = c.display().to_string();
        if c.as_os_str().len() > SUN_PATH_MAX {
            return Err(too_long("the control socket", text));
        }
    }
    if let Some(dir) = runtime_dir {
        let path = dir.join(NOTIFY_SOCKET_NAME_MAX).display().to_string();
        if path.len() > SUN_PATH_MAX {
            return Err(too_long("the notify socket (at most)", path));
        }
    }
    Ok(())
}

/// `--workers N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(u32),
}

/// The most workers one supervisor will run.
pub const MAX_WORKERS: u32 = 4096;

impl FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Workers::Auto);
        }
        match s.parse::<u32>() {
            Ok(0) => Err("--workers must be at least 1 (or `auto` for one per CPU)".into()),
            Ok(n) if n > MAX_WORKERS => {
                Err(format!("--workers {n} is above the limit of {MAX_WORKERS}"))
            }
            Ok(n) => Ok(Workers::Count(n)),
            Err(_) => Err(format!(
                "invalid worker count {s:?}: expected a number or `auto`"
            )),
        }
    }
}

impl fmt::Display for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Count(n) => write!(f, "{n}"),
        }
    }
}

impl Workers {
    /// The concrete count: `auto` is the number of CPUs this process may run on.
    pub fn resolve(self) -> u32 {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| {
                u32::try_from(n.get())
                    .unwrap_or(MAX_WORKERS)
                    .min(MAX_WORKERS)
            }),
        }
    }
}

/// `--ready notify|exec|after:DUR`: when a worker counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    /// The worker sends `READY=1` to `$NOTIFY_SOCKET`.
    Notify,
    /// Ready as soon as the command was executed.
    Exec,
    /// Ready once it has stayed alive this long.
    After(Duration),
}

impl FromStr for ReadyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notify" => Ok(ReadyMode::Notify),
            "exec" => Ok(ReadyMode::Exec),
            _ => match s.strip_prefix("after:") {
                Some(d) => Ok(ReadyMode::After(d.parse::<Dur>()?.0)),
                None => Err(format!(
                    "invalid readiness mode {s:?}: expected notify, exec or after:DURATION"
                )),
            },
        }
    }
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadyMode::Notify => f.write_str("notify"),
            ReadyMode::Exec => f.write_str("exec"),
            ReadyMode::After(d) => write!(f, "after:{}", Dur(*d)),
        }
    }
}

/// `--restart-delay MIN..MAX`: exponential backoff bounds for refilling a crashed slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartDelay {
    pub min: Duration,
    pub max: Duration,
}

impl Default for RestartDelay {
    fn default() -> Self {
        RestartDelay {
            min: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl FromStr for RestartDelay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = if let Some((a, b)) = s.split_once("..") {
            (a.parse::<Dur>()?.0, b.parse::<Dur>()?.0)
        } else {
            let d = s.parse::<Dur>()?.0;
            (d, d)
        };
        if min > max {
            return Err(format!(
                "invalid restart delay {s:?}: MIN is larger than MAX"
            ));
        }
        Ok(RestartDelay { min, max })
    }
}

impl fmt::Display for RestartDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", Dur(self.min), Dur(self.max))
    }
}

/// A signal given by name (`TERM`, `SIGTERM`, `sigquit`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub nix::sys::signal::Signal);

impl FromStr for Sig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use nix::sys::signal::Signal;
        if let Ok(n) = s.parse::<i32>() {
            return Signal::try_from(n)
                .map(Sig)
                .map_err(|_| format!("unknown signal number {n}"));
        }
        let upper = s.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        name.parse::<Signal>()
            .map(Sig)
            .map_err(|_| format!("unknown signal {s:?} (examples: TERM, INT, QUIT, USR1)"))
    }
}

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// A memory size: `512M`, `1G`, `1.5G`, `64K`, or bytes. Binary units (K = 1024), as in
/// systemd's `MemoryMax=`; `KiB`/`MiB`/`GiB`/`TiB` and a trailing `B` are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected a number (examples: 512M, 1G)"))?;
        let unit = unit.trim().to_ascii_uppercase();
        let unit = unit.strip_suffix("IB").map_or_else(
            || unit.strip_suffix('B').unwrap_or(&unit).to_string(),
            str::to_string,
        );
        let scale: u64 = match unit.as_str() {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use K, M, G or T)"
                ));
            }
        };
        #[allow(clippy::cast_precision_loss)]
        let bytes = value * scale as f64;
        if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
            return Err(format!("invalid size {s:?}: out of range"));
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(Size(bytes.round() as u64))
    }
}

impl fmt::Display for Size {
    /// The largest unit that is exact: `512M`, `1G`, `1536K`, `1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

/// An age limit with jitter: `6h`, `6h±10%` (or `6h+-10%`): each worker gets its own limit,
/// drawn evenly from 6h − 10% .. 6h + 10%, so that slots started together do not all
/// reach it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgeLimit {
    pub base: Duration,
    /// Percent, 0..=50.
    pub jitter: u32,
}

impl AgeLimit {
    /// The limit for `u`, a number in 0..=1 (0 gives base − jitter, 1 base + jitter).
    pub fn pick(&self, u: f64) -> Duration {
        let spread = f64::from(self.jitter) / 100.0;
        self.base
            .mul_f64((1.0 - spread + 2.0 * spread * u.clamp(0.0, 1.0)).max(0.0))
    }
}

impl FromStr for AgeLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (base, jitter) = match t.split_once('±').or_else(|| t.split_once("+-")) {
            Some((b, j)) => {
                let j = j.trim();
                let pct = j.strip_suffix('%').ok_or_else(|| {
                    format!("invalid age {s:?}: the jitter is a percentage, e.g. 6h±10%")
                })?;
                let pct: u32 = pct
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid age {s:?}: bad jitter {j:?} (e.g. 10%)"))?;
                if pct > 50 {
                    return Err(format!("invalid age {s:?}: the jitter is at most 50%"));
                }
                (b.parse::<Dur>()?.0, pct)
            }
            None => (t.parse::<Dur>()?.0, 0),
        };
        if base < Duration::from_secs(1) {
            return Err(format!(
                "invalid age {s:?}: at least 1s (a worker must have time to start and serve)"
            ));
        }
        Ok(AgeLimit { base, jitter })
    }
}

impl fmt::Display for AgeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.jitter == 0 {
            write!(f, "{}", Dur(self.base))
        } else {
            write!(f, "{}±{}%", Dur(self.base), self.jitter)
        }
    }
}

/// The oldest systemd gen-units writes units for (RHEL 8 has 239). Older versions lack
/// `PrivateMounts=`, `@system-service` refinements and more.
pub const MIN_SYSTEMD_VERSION: u32 = 239;

/// `--systemd-version N|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionArg {
    Auto,
    Fixed(u32),
}

impl std::str::FromStr for VersionArg {
    type Err = String;

    /// A usage error (exit 2) when not a supported version.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(VersionArg::Auto);
        }
        let n: u32 = s
            .parse()
            .map_err(|_| "expected a version number such as 252, or `auto`".to_string())?;
        systemd_version_supported(n)?;
        Ok(VersionArg::Fixed(n))
    }
}

pub fn systemd_version_supported(version: u32) -> Result<(), String> {
    if version < MIN_SYSTEMD_VERSION {
        return Err(format!(
            "systemd {version} is older than {MIN_SYSTEMD_VERSION}, the oldest version gen-units \
             writes units for"
        ));
    }
    Ok(())
}

/// `--log-rate-limit BURST/INTERVAL`: journald's per-unit rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRateLimit {
    pub burst: u32,
    pub interval: Dur,
}

impl std::str::FromStr for LogRateLimit {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (burst, interval) = s
            .split_once('/')
            .ok_or_else(|| format!("expected BURST/INTERVAL such as 10000/30s, not {s:?}"))?;
        let burst: u32 = burst
            .parse()
            .map_err(|_| format!("BURST {burst:?} is not a number of messages"))?;
        let interval: Dur = interval.parse()?;
        if burst == 0 || interval.0.is_zero() {
            return Err(
                "BURST and INTERVAL must be above 0 (leave the option out for no limit)".into(),
            );
        }
        Ok(LogRateLimit { burst, interval })
    }
}

impl std::fmt::Display for LogRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.burst, self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Duration {
        s.parse::<Dur>().unwrap().0
    }

    #[test]
    fn durations() {
        assert_eq!(d("30"), Duration::from_secs(30));
        assert_eq!(d("1.5"), Duration::from_millis(1500));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("2m"), Duration::from_secs(120));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("10us"), Duration::from_micros(10));
        assert_eq!(d("0"), Duration::ZERO);
        for bad in ["", "abc", "5x", "-1", "s", "1..2", "1e99"] {
            assert!(bad.parse::<Dur>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn duration_display_round_trips() {
        for s in ["0", "250ms", "30s", "2min", "1h", "90s", "10us", "1500ms"] {
            let v: Dur = s.parse().unwrap();
            assert_eq!(v.to_string().parse::<Dur>().unwrap(), v, "{s}");
        }
        assert_eq!(Dur(Duration::from_secs(90)).to_string(), "90s");
        assert_eq!(Dur(Duration::from_secs(120)).to_string(), "2min");
    }

    #[test]
    fn listen_specs() {
        let s: ListenSpec = "8080".parse().unwrap();
        assert_eq!(s.address, Address::Tcp("[::]:8080".parse().unwrap()));
        assert_eq!(s.listen_stream(), "8080");
        let s: ListenSpec = "web=127.0.0.1:8080".parse().unwrap();
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.address, Address::Tcp("127.0.0.1:8080".parse().unwrap()));
        let s: ListenSpec = "[::1]:9000".parse().unwrap();
        assert_eq!(s.address, Address::Tcp("[::1]:9000".parse().unwrap()));
        let s: ListenSpec = "api=unix:/run/app.sock".parse().unwrap();
        assert_eq!(s.address, Address::Unix("/run/app.sock".into()));
        assert_eq!(s.listen_stream(), "/run/app.sock");
        for bad in [
            "",
            "0",
            "70000",
            "localhost:80",
            "[127.0.0.1]:80",
            "::1:80",
            "unix:rel.sock",
            "a:b=80",
            "=80",
            "1.2.3.4",
            "we b=80",
            "x=127.0.0.1:0",
        ] {
            assert!(
                bad.parse::<ListenSpec>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn listen_errors_name_the_problem() {
        let err = |s: &str| s.parse::<ListenSpec>().unwrap_err();
        assert!(err("localhost:8080").contains("HOST must be an IP address"));
        assert!(err("example.com:80").contains("HOST must be an IP address"));
        assert!(err("127.0.0.1:70000").contains("port \"70000\" out of range 1..65535"));
        assert!(err("127.0.0.1:http").contains("out of range 1..65535"));
        assert!(err("70000").contains("out of range 1..65535"));
        assert!(err("[127.0.0.1]:80").contains("brackets"));
        assert!(err("0").contains("port 0"));
    }

    #[test]
    fn same_listen_twice_is_listed_twice() {
        let l = |s: &str| s.parse::<ListenSpec>().unwrap();
        assert!(check_listen_unique(&[l("80"), l("127.0.0.1:80")]).is_ok());
        let e = check_listen_unique(&[l("127.0.0.1:80"), l("web=127.0.0.1:80")]).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn socket_path_lengths() {
        use std::path::Path;
        assert!(check_socket_paths(Some(Path::new("/run/a/control.sock")), None).is_ok());
        let long = format!("/run/{}/control.sock", "a".repeat(90));
        assert!(
            check_socket_paths(Some(Path::new(&long)), None)
                .unwrap_err()
                .contains("107")
        );
        // 82 characters of name fit, 83 do not (the notify socket is the longer one).
        let ok = format!("/run/{}", "a".repeat(82));
        assert!(check_socket_paths(None, Some(Path::new(&ok))).is_ok());
        let bad = format!("/run/{}", "a".repeat(83));
        let e = check_socket_paths(None, Some(Path::new(&bad))).unwrap_err();
        assert!(e.contains("notify socket"), "{e}");
    }

    #[test]
    fn workers_and_modes() {
        assert_eq!("auto".parse::<Workers>(), Ok(Workers::Auto));
        assert_eq!("4".parse::<Workers>(), Ok(Workers::Count(4)));
        assert!("0".parse::<Workers>().unwrap_err().contains("at least 1"));
        assert!("-1".parse::<Workers>().is_err());
        assert!(Workers::Auto.resolve() >= 1);
        assert_eq!("notify".parse::<ReadyMode>(), Ok(ReadyMode::Notify));
        assert_eq!("exec".parse::<ReadyMode>(), Ok(ReadyMode::Exec));
        assert_eq!(
            "after:2s".parse::<ReadyMode>(),
            Ok(ReadyMode::After(Duration::from_secs(2)))
        );
        assert!("later".parse::<ReadyMode>().is_err());
        assert_eq!(
            ReadyMode::After(Duration::from_secs(2)).to_string(),
            "after:2s"
        );
    }

    #[test]
    fn restart_delays_and_signals() {
        use nix::sys::signal::Signal;
        let r: RestartDelay = "100ms..30s".parse().unwrap();
        assert_eq!(r, RestartDelay::default());
        assert_eq!(r.to_string(), "100ms..30s");
        assert!("5s..1s".parse::<RestartDelay>().is_err());
        assert_eq!(
            "1s".parse::<RestartDelay>().unwrap().max,
            Duration::from_secs(1)
        );
        assert_eq!("TERM".parse::<Sig>(), Ok(Sig(Signal::SIGTERM)));
        assert_eq!("sigquit".parse::<Sig>(), Ok(Sig(Signal::SIGQUIT)));
        assert_eq!("15".parse::<Sig>(), Ok(Sig(Signal::SIGTERM)));
        assert!("NOPE".parse::<Sig>().is_err());
    }

    #[test]
    fn sizes() {
        let z = |s: &str| s.parse::<Size>().map(|v| v.0);
        assert_eq!(z("512M"), Ok(512 << 20));
        assert_eq!(z("1G"), Ok(1 << 30));
        assert_eq!(z("1.5G"), Ok(3 << 29));
        assert_eq!(z("64KiB"), Ok(64 << 10));
        assert_eq!(z("100mb"), Ok(100 << 20));
        assert_eq!(z("4096"), Ok(4096));
        for bad in ["", "M", "12X", "-1M", "0", "1e30"] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?} should be rejected");
        }
        for s in ["512M", "1G", "1536K", "1000", "3T"] {
            assert_eq!(s.parse::<Size>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn age_limits() {
        let a: AgeLimit = "6h±10%".parse().unwrap();
        assert_eq!((a.base, a.jitter), (Duration::from_secs(6 * 3600), 10));
        assert_eq!(a.to_string(), "6h±10%");
        assert_eq!("6h+-10%".parse::<AgeLimit>(), Ok(a));
        assert_eq!(a.pick(0.0), Duration::from_secs(6 * 3600 - 2160));
        assert_eq!(a.pick(1.0), Duration::from_secs(6 * 3600 + 2160));
        assert_eq!(a.pick(0.5), Duration::from_secs(6 * 3600));
        let plain: AgeLimit = "30min".parse().unwrap();
        assert_eq!((plain.jitter, plain.to_string()), (0, "30min".to_string()));
        assert_eq!(plain.pick(0.9), Duration::from_secs(1800));
        for bad in ["", "6h±", "6h±10", "6h±60%", "500ms", "x±5%"] {
            assert!(
                bad.parse::<AgeLimit>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn version_flag() {
        let p = |s: &str| s.parse::<VersionArg>();
        assert_eq!(p("auto").unwrap(), VersionArg::Auto);
        assert_eq!(p("252").unwrap(), VersionArg::Fixed(252));
        assert_eq!(p("257").unwrap(), VersionArg::Fixed(257));
        for bad in ["", "v252", "252.1", "-1", "latest"] {
            assert!(p(bad).unwrap_err().contains("version number"), "{bad:?}");
        }
        assert!(p("238").unwrap_err().contains("older"));
    }
}
