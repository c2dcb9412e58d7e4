//! The gen-units command line turned into a checked description of the two units
//! (`UnitSpec`): names, sockets, identity, paths, the resolved worker command and systemd
//! version. Every semantic check happens here, before anything is rendered or written;
//! the text-level checks (what can be quoted into a unit file) happen in `render.rs`.
//! What gen-units asks the machine (PATH lookup, `systemctl --version`, its own path) goes
//! through the `Host` trait so tests can pin it.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::SupervisorOpts;
use crate::config::{Address, Dur, ListenSpec, ReadyMode};
use crate::error::{Context, Error, Result};

use super::GenUnitsArgs;
use super::version::{self, VersionArg};

/// `--hardening strict|jit|none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hardening {
    /// Everything that a network server supervised by clusterctl does not need is denied.
    Strict,
    /// Strict minus `MemoryDenyWriteExecute=`, which JIT compilers (V8, HotSpot, LuaJIT,
    /// PCRE-JIT) trip over: they need memory that is first writable, then executable; and
    /// minus `ProcSubset=pid`, which hides /proc/cpuinfo and /proc/stat from runtimes.
    Jit,
    /// No sandboxing settings at all.
    None,
}

impl Hardening {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "strict" => Ok(Hardening::Strict),
            "jit" => Ok(Hardening::Jit),
            "none" => Ok(Hardening::None),
            _ => Err(Error::config(format!(
                "invalid --hardening {s:?}: expected strict (default), jit (for JIT runtimes \
                 such as Node, the JVM or LuaJIT) or none"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hardening::Strict => "strict",
            Hardening::Jit => "jit",
            Hardening::None => "none",
        }
    }
}

/// Who the service runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `DynamicUser=yes`: a user allocated while the service runs (the default).
    Dynamic { group: Option<String> },
    /// `User=` (and `Group=`) naming an existing account.
    Static { user: String, group: Option<String> },
    /// A unit for `systemctl --user`: runs as the user who owns the manager.
    UserManager,
}

/// Both units, described and checked; `render.rs` turns this into text.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub app: String,
    pub listen: Vec<ListenSpec>,
    /// `FileDescriptorName=`: the one name all sockets share, if any was given.
    pub fd_name: Option<String>,
    pub opts: SupervisorOpts,
    pub watchdog: Option<Dur>,
    pub identity: Identity,
    pub working_directory: Option<String>,
    pub environment: Vec<(String, String)>,
    pub environment_file: Option<String>,
    pub hardening: Hardening,
    pub systemd_version: u32,
    pub description: Option<String>,
    pub user_units: bool,
    /// Absolute path of clusterctl on the target machine.
    pub clusterctl: String,
    /// The worker command; `command[0]` is an absolute path.
    pub command: Vec<String>,
}

/// What gen-units needs to know about the machine it runs on.
pub trait Host {
    /// The systemd version for `--systemd-version auto`.
    fn systemd_version(&self) -> Result<u32>;
    /// Where this clusterctl binary lives, for the default of `--clusterctl`.
    fn current_exe(&self) -> Result<PathBuf>;
    /// Resolves a worker program that is not an absolute path.
    fn resolve_program(&self, program: &Path) -> Result<PathBuf>;
}

/// The real machine.
#[derive(Debug)]
pub struct System;

impl Host for System {
    fn systemd_version(&self) -> Result<u32> {
        version::detect()
    }

    fn current_exe(&self) -> Result<PathBuf> {
        let exe = env::current_exe().context(|| "cannot find clusterctl's own path".into())?;
        fs::canonicalize(&exe).context(|| format!("cannot resolve {}", exe.display()))
    }

    fn resolve_program(&self, program: &Path) -> Result<PathBuf> {
        resolve_program(program, env::var_os("PATH").as_deref())
    }
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A relative worker program: `./server` is taken relative to the current directory, a bare
/// `python3` is looked up in `PATH`, now, so the unit names an absolute path and a missing
/// program is reported while generating rather than when the service starts.
pub fn resolve_program(program: &Path, path_var: Option<&OsStr>) -> Result<PathBuf> {
    if program.is_absolute() {
        return Ok(program.to_path_buf());
    }
    if program.as_os_str().is_empty() {
        return Err(Error::config("the worker command is empty"));
    }
    if program.components().count() > 1 || program.starts_with(".") {
        if !is_executable_file(program) {
            return Err(Error::config(format!(
                "worker command {} is not an executable file (relative to {})",
                program.display(),
                env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string())
            )));
        }
        return fs::canonicalize(program)
            .context(|| format!("cannot resolve {}", program.display()));
    }
    let dirs = path_var.map(env::split_paths).into_iter().flatten();
    for dir in dirs.filter(|d| d.is_absolute()) {
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    Err(Error::config(format!(
        "worker command {:?} was not found in PATH; give its absolute path (systemd would \
         search its own fixed path when the service starts, which may find another program \
         or none)",
        program.display().to_string()
    )))
}

/// The longest `sun_path` a unix socket may have, without the trailing NUL.
const SUN_PATH_MAX: usize = 107;

/// Checks APP against systemd's unit name rules (systemd.unit(5)) and what clusterctl does
/// with it: APP is also the `RuntimeDirectory=`, the `SyslogIdentifier=` and part of the
/// control socket path, so the accepted set is narrower than systemd's.
pub fn check_app_name(app: &str, user_units: bool) -> Result<(), String> {
    if app.is_empty() {
        return Err("the application name is empty".into());
    }
    if let Some(c) = app
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        let why = match c {
            '@' => "'@' would make APP.service a template unit (APP@INSTANCE.service)".into(),
            ':' => "':' is valid in unit names, but APP is also the RuntimeDirectory= name, \
                    where ':' introduces a symlink"
                .into(),
            '\\' => "'\\' is valid in unit names only as part of systemd-escape sequences, \
                     and APP is also used as a directory name"
                .into(),
            _ => format!("{c:?} is not allowed in a unit name"),
        };
        return Err(format!(
            "invalid application name {app:?}: {why}; use ASCII letters, digits, '_', '.' and '-'"
        ));
    }
    if app.starts_with('.') {
        return Err(format!(
            "invalid application name {app:?}: systemd ignores unit files whose name starts with '.'"
        ));
    }
    if app.starts_with('-') {
        return Err(format!(
            "invalid application name {app:?}: systemctl would read a name starting with '-' as an option"
        ));
    }
    let unit_len = app.len() + ".service".len();
    if unit_len > 255 {
        return Err(format!(
            "application name is too long: {app}.service has {unit_len} characters, systemd allows 255"
        ));
    }
    // The supervisor's control socket is %t/APP/control.sock. For user managers %t is
    // $XDG_RUNTIME_DIR = /run/user/UID, counted here with the longest UID.
    let runtime = if user_units {
        "/run/user/4294967295"
    } else {
        "/run"
    };
    let socket = format!("{runtime}/{app}/control.sock");
    if socket.len() > SUN_PATH_MAX {
        return Err(format!(
            "application name is too long: the control socket {socket} would exceed the \
             {SUN_PATH_MAX} bytes a unix socket path may have"
        ));
    }
    Ok(())
}

/// Checks a `User=`/`Group=` name: systemd's portable rule (letters, digits, '_', '-', not
/// starting with a digit or '-', at most 31 characters) or a numeric id.
fn check_account_name(flag: &str, name: &str) -> Result<()> {
    let numeric = !name.is_empty() && name.chars().all(|c| c.is_ascii_digit());
    let portable = name.len() <= 31
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if numeric || portable {
        Ok(())
    } else {
        Err(Error::config(format!(
            "invalid {flag} {name:?}: use a name of at most 31 ASCII letters, digits, '_' and '-' \
             (not starting with a digit or '-'), or a numeric id"
        )))
    }
}

/// Variables systemd or clusterctl set for each worker; setting them in the unit would be
/// overwritten or break socket activation.
const RESERVED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUNTIME_DIRECTORY",
    "WORKER_ID",
    "CLUSTER_WORKERS",
    "CLUSTER_GENERATION",
];

fn parse_environment(items: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            return Err(Error::config(format!(
                "invalid --environment {item:?}: expected KEY=VALUE"
            )));
        };
        super::quote::check_env_name(key)
            .map_err(|e| Error::config(format!("invalid --environment {item:?}: {e}")))?;
        if RESERVED_ENV.contains(&key) {
            return Err(Error::config(format!(
                "--environment {key}=...: {key} is set by systemd or clusterctl for each worker"
            )));
        }
        if out.iter().any(|(k, _)| k == key) {
            return Err(Error::config(format!("--environment {key} is given twice")));
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// A path option as UTF-8 text (unit files are UTF-8).
fn utf8<'a>(what: &str, value: &'a OsStr) -> Result<&'a str> {
    value.to_str().ok_or_else(|| {
        Error::config(format!(
            "{what} {:?} is not valid UTF-8; systemd unit files are UTF-8 text",
            value.to_string_lossy()
        ))
    })
}

/// An absolute, normalized path (no `.` or `..` components), as systemd requires for
/// WorkingDirectory=, EnvironmentFile= and commands.
fn absolute_path(what: &str, path: &Path) -> Result<String> {
    let text = utf8(what, path.as_os_str())?;
    if !text.starts_with('/') {
        return Err(Error::config(format!(
            "{what} {text:?} must be an absolute path"
        )));
    }
    if text.split('/').any(|part| part == "." || part == "..") {
        return Err(Error::config(format!(
            "{what} {text:?} must not contain '.' or '..' components"
        )));
    }
    Ok(text.to_string())
}

/// The sockets' names: one `.socket` unit has one `FileDescriptorName=` for all its
/// sockets, so either no `--listen` is named (workers see the default name `APP.socket`) or
/// all carry the same name.
fn socket_name(listen: &[ListenSpec]) -> Result<Option<String>> {
    let first = listen.first().and_then(|l| l.name.clone());
    if listen.iter().all(|l| l.name == first) {
        return Ok(first);
    }
    let names: Vec<String> = listen
        .iter()
        .map(|l| l.name.clone().unwrap_or_else(|| "(unnamed)".into()))
        .collect();
    Err(Error::config(format!(
        "the --listen sockets have different names ({}), but one socket unit gives all its \
         sockets the same name (FileDescriptorName=). Name them all the same, or none (workers \
         then see APP.socket); for differently named sockets, write one more socket unit by \
         hand (e.g. APP-admin.socket with FileDescriptorName=admin and Service=APP.service) \
         and add it to the service with Sockets=APP.socket APP-admin.socket",
        names.join(", ")
    )))
}

impl UnitSpec {
    /// Checks the command line and resolves what it leaves open (version, paths).
    pub fn from_args(args: &GenUnitsArgs, host: &dyn Host) -> Result<UnitSpec> {
        check_app_name(&args.app, args.user_units).map_err(Error::Config)?;
        let hardening = Hardening::parse(&args.hardening)?;
        let version_arg = VersionArg::parse(&args.systemd_version)?;

        if args.listen.is_empty() {
            return Err(Error::config(
                "at least one --listen is needed: the socket unit holds the listening sockets",
            ));
        }
        for (i, l) in args.listen.iter().enumerate() {
            if args.listen[..i].iter().any(|o| o.address == l.address) {
                return Err(Error::config(format!("--listen {} is given twice", l.raw)));
            }
        }
        let fd_name = socket_name(&args.listen)?;

        if let Some(w) = args.watchdog
            && w.0.is_zero()
        {
            return Err(Error::config(
                "--watchdog 0 would disable the watchdog; leave the option out instead",
            ));
        }

        let identity = if args.user_units {
            if args.user.is_some() || args.group.is_some() {
                return Err(Error::config(
                    "--user and --group cannot be used with --user-units: a user manager runs \
                     services as its own user",
                ));
            }
            Identity::UserManager
        } else {
            if let Some(u) = &args.user {
                check_account_name("--user", u)?;
            }
            if let Some(g) = &args.group {
                check_account_name("--group", g)?;
            }
            match &args.user {
                Some(user) => Identity::Static {
                    user: user.clone(),
                    group: args.group.clone(),
                },
                None => Identity::Dynamic {
                    group: args.group.clone(),
                },
            }
        };

        let working_directory = args
            .working_directory
            .as_deref()
            .map(|p| absolute_path("--working-directory", p))
            .transpose()?;
        let environment_file = args
            .environment_file
            .as_deref()
            .map(|p| absolute_path("--environment-file", p))
            .transpose()?;
        let environment = parse_environment(&args.environment)?;

        let command = resolve_command(&args.command, host)?;

        let clusterctl = match &args.clusterctl {
            Some(p) => p.clone(),
            None => host.current_exe()?,
        };
        let clusterctl = absolute_path("--clusterctl", &clusterctl)?;

        let systemd_version = match version_arg {
            VersionArg::Fixed(n) => n,
            VersionArg::Auto => host.systemd_version()?,
        };

        Ok(UnitSpec {
            app: args.app.clone(),
            listen: args.listen.clone(),
            fd_name,
            opts: args.opts.clone(),
            watchdog: args.watchdog,
            identity,
            working_directory,
            environment,
            environment_file,
            hardening,
            systemd_version,
            description: args.description.clone(),
            user_units: args.user_units,
            clusterctl,
            command,
        })
    }

    /// Units for systemd ≥ 253 use `Type=notify-reload`; older ones an `ExecReload=`.
    pub fn notify_reload(&self) -> bool {
        self.systemd_version >= version::NOTIFY_RELOAD_SINCE
    }

    /// Whether every socket is TCP (`NoDelay=` is a TCP option).
    pub fn all_tcp(&self) -> bool {
        self.listen
            .iter()
            .all(|l| matches!(l.address, Address::Tcp(_)))
    }

    /// How long systemd waits for READY=1 (and for a reload): above clusterctl's own limit
    /// for the first generation (`START_ATTEMPTS` starts of up to `--ready-timeout` or
    /// `--ready after:DUR` each, plus the backoff between them), so clusterctl gives up and
    /// reports the failure itself before systemd's timer fires.
    pub fn timeout_start(&self) -> Dur {
        use crate::supervisor::state::START_ATTEMPTS;
        let after = match self.opts.ready {
            ReadyMode::After(d) => d,
            ReadyMode::Notify | ReadyMode::Exec => Duration::ZERO,
        };
        let attempt = self.opts.ready_timeout.0.max(after);
        let backoff: Duration = (0..START_ATTEMPTS - 1)
            .map(|i| (self.opts.restart_delay.min * 2u32.pow(i)).min(self.opts.restart_delay.max))
            .sum();
        let total = attempt * START_ATTEMPTS + backoff + Duration::from_secs(30);
        // Whole seconds, rounded up: easier to read in the unit file.
        Dur(Duration::from_secs(
            total.as_secs() + u64::from(total.subsec_nanos() > 0),
        ))
    }

    /// How long systemd waits for clusterctl to exit: above `--stop-timeout`, so the workers
    /// get their full drain time and clusterctl can kill stragglers before systemd does.
    pub fn timeout_stop(&self) -> Dur {
        Dur(self.opts.stop_timeout.0 + Duration::from_secs(15))
    }

    /// A canonical command line that renders these units again: defaults left out, the
    /// version, clusterctl path and worker program resolved, output options left out.
    pub fn invocation(&self) -> Vec<String> {
        fn push(v: &mut Vec<String>, flag: &str, value: &str) {
            v.push(format!("--{flag}"));
            v.push(value.to_string());
        }
        let mut v: Vec<String> = vec!["clusterctl".into(), "gen-units".into(), self.app.clone()];
        for l in &self.listen {
            match &l.name {
                Some(name) => push(&mut v, "listen", &format!("{name}={}", l.raw)),
                None => push(&mut v, "listen", &l.raw),
            }
        }
        v.extend(self.opts.to_run_args());
        if let Some(w) = self.watchdog {
            push(&mut v, "watchdog", &w.to_string());
        }
        match &self.identity {
            Identity::Static { user, group } => {
                push(&mut v, "user", user);
                if let Some(g) = group {
                    push(&mut v, "group", g);
                }
            }
            Identity::Dynamic { group: Some(g) } => push(&mut v, "group", g),
            Identity::Dynamic { group: None } | Identity::UserManager => {}
        }
        if let Some(d) = &self.working_directory {
            push(&mut v, "working-directory", d);
        }
        for (k, val) in &self.environment {
            push(&mut v, "environment", &format!("{k}={val}"));
        }
        if let Some(f) = &self.environment_file {
            push(&mut v, "environment-file", f);
        }
        if self.hardening != Hardening::Strict {
            push(&mut v, "hardening", self.hardening.name());
        }
        if let Some(d) = &self.description {
            push(&mut v, "description", d);
        }
        push(&mut v, "systemd-version", &self.systemd_version.to_string());
        push(&mut v, "clusterctl", &self.clusterctl);
        if self.user_units {
            v.push("--user-units".into());
        }
        v.push("--".into());
        v.extend(self.command.iter().cloned());
        v
    }
}

/// The worker command as UTF-8 strings with an absolute program path.
fn resolve_command(command: &[OsString], host: &dyn Host) -> Result<Vec<String>> {
    let Some((program, args)) = command.split_first() else {
        return Err(Error::config("the worker command is missing (after --)"));
    };
    let program = host.resolve_program(Path::new(program))?;
    let program = absolute_path("the worker program", &program)?;
    let mut out = vec![program];
    for (i, arg) in args.iter().enumerate() {
        out.push(utf8(&format!("argument {} of the worker command", i + 1), arg)?.to_string());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn app_names() {
        for good in ["demo", "my-app", "my_app.v2", "A1", &"a".repeat(89)] {
            assert!(check_app_name(good, false).is_ok(), "{good:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("web@", "template"),
            ("a@b", "template"),
            ("a:b", "RuntimeDirectory"),
            ("a\\x2db", "systemd-escape"),
            ("a b", "not allowed"),
            ("a/b", "not allowed"),
            ("héllo", "not allowed"),
            ("a%b", "not allowed"),
            (".hidden", "starts with '.'"),
            ("-x", "option"),
            ("a\nb", "not allowed"),
        ] {
            let err = check_app_name(bad, false).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        // The control socket bounds the length well below systemd's 255.
        assert!(
            check_app_name(&"a".repeat(90), false)
                .unwrap_err()
                .contains("107")
        );
        assert!(check_app_name(&"a".repeat(73), true).is_ok());
        assert!(check_app_name(&"a".repeat(74), true).is_err());
    }

    #[test]
    fn account_names() {
        for good in ["www-data", "_app", "app1", "1000", &"a".repeat(31)] {
            assert!(check_account_name("--user", good).is_ok(), "{good:?}");
        }
        for bad in ["", "1abc", "-x", "a b", "a.b", "a%b", "é", &"a".repeat(32)] {
            assert!(check_account_name("--user", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn environment_items() {
        let env = parse_environment(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(
            env,
            [
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), String::new())
            ]
        );
        for bad in ["NOEQUALS", "=v", "1A=v", "A-B=v", "LISTEN_FDS=3"] {
            assert!(parse_environment(&[bad.into()]).is_err(), "{bad:?}");
        }
        assert!(parse_environment(&["A=1".into(), "A=2".into()]).is_err());
    }

    #[test]
    fn socket_names() {
        let l = |s: &str| s.parse::<ListenSpec>().unwrap();
        assert_eq!(socket_name(&[l("80"), l("443")]).unwrap(), None);
        assert_eq!(
            socket_name(&[l("web=80"), l("web=[::1]:81")]).unwrap(),
            Some("web".into())
        );
        let err = socket_name(&[l("web=80"), l("81")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("web, (unnamed)") && err.contains("Sockets="),
            "{err}"
        );
        assert!(socket_name(&[l("web=80"), l("admin=81")]).is_err());
    }

    #[test]
    fn paths() {
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(
            absolute_path("x", Path::new("/srv/my app")).unwrap(),
            "/srv/my app"
        );
        for bad in ["rel", "./x", "/a/../b", "/a/./b", ""] {
            assert!(absolute_path("x", Path::new(bad)).is_err(), "{bad:?}");
        }
        let err = absolute_path("x", Path::new(OsStr::from_bytes(b"/a\xffb"))).unwrap_err();
        assert!(err.to_string().contains("UTF-8"));
    }

    #[test]
    fn program_lookup() {
        let path = OsString::from("relative/dir:/nonexistent:/bin:/usr/bin");
        let sh = resolve_program(Path::new("sh"), Some(&path)).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(
            resolve_program(Path::new("/opt/not/here"), None).unwrap(),
            Path::new("/opt/not/here")
        );
        let err = resolve_program(Path::new("no-such-program-xyz"), Some(&path)).unwrap_err();
        assert!(matches!(err, Error::Config(_)) && err.to_string().contains("PATH"));
        assert!(resolve_program(Path::new("sh"), None).is_err());
        assert!(resolve_program(Path::new("./no-such-file"), None).is_err());
    }
}
