//! The gen-units command line turned into a checked description of the two units
//! (`UnitSpec`): names, sockets, identity, paths, the resolved worker command and systemd
//! version. The supervisor's options are checked by `Settings::new`, the same function
//! `clusterctl run` uses (so a unit never carries options `run` refuses); the checks that
//! only units have (names, accounts, paths, environment) happen here, before anything is
//! rendered or written; the text-level checks (what can be quoted into a unit file) happen
//! in `render.rs`. What gen-units asks the machine (PATH lookup through
//! `settings::path`, `systemctl --version`, its own path) goes through the `Host` trait
//! so tests can pin it.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};

use crate::cli::{GenUnitsArgs, Hardening};
use crate::config::{Address, Dur, ListenSpec, LogRateLimit, VersionArg};
use crate::error::{Context, Error, Result};
use crate::settings::path::{self, RunsOn};
use crate::settings::{Settings, SocketPaths};

use super::version;

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
    /// The supervisor's options, checked by the same function as `clusterctl run`'s.
    pub opts: Settings,
    pub watchdog: Option<Dur>,
    pub identity: Identity,
    /// `WorkingDirectory=`: given, or the directory gen-units ran in.
    pub working_directory: String,
    pub environment: Vec<(String, String)>,
    pub environment_file: Option<String>,
    pub hardening: Hardening,
    /// Why `jit` was picked without `--hardening` (the JIT runtime found), for the unit.
    pub hardening_reason: Option<String>,
    pub systemd_version: u32,
    pub log_rate_limit: Option<LogRateLimit>,
    pub description: Option<String>,
    pub user_units: bool,
    /// Absolute path of clusterctl on the target machine.
    pub clusterctl: String,
    /// The worker command; `command[0]` is an absolute path.
    pub command: Vec<String>,
    /// What gen-units decided on its own (printed on stderr).
    pub notes: Vec<String>,
    /// What will probably fail under systemd, with the fix (printed on stderr).
    pub warnings: Vec<String>,
}

/// What gen-units needs to know about the machine it runs on.
pub trait Host {
    /// The systemd version for `--systemd-version auto`.
    fn systemd_version(&self) -> Result<u32>;
    /// Where this clusterctl binary lives, for the default of `--clusterctl`.
    fn current_exe(&self) -> Result<PathBuf>;
    /// Resolves a worker program that is not an absolute path.
    fn resolve_program(&self, program: &Path) -> Result<PathBuf>;
    /// The directory gen-units runs in, the default of `--working-directory`.
    fn current_dir(&self) -> Result<PathBuf>;
    /// The file a program path leads to, through symlinks (`/usr/bin/node` →
    /// `/usr/bin/nodejs`), and the interpreter its `#!` line names, if any. `None` when
    /// the path does not exist here (the units may be for another machine).
    fn inspect_program(&self, program: &Path) -> Option<(PathBuf, Option<Vec<String>>)>;
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
        let path_var = env::var_os("PATH");
        path::resolve_program(program.as_os_str(), path_var.as_deref(), RunsOn::Target)
            .map_err(Error::Config)
    }

    fn current_dir(&self) -> Result<PathBuf> {
        env::current_dir().context(|| "cannot tell the current directory".into())
    }

    fn inspect_program(&self, program: &Path) -> Option<(PathBuf, Option<Vec<String>>)> {
        let real = fs::canonicalize(program).ok()?;
        let mut head = [0u8; 256];
        let n = fs::File::open(&real)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .unwrap_or(0);
        let shebang = head[..n]
            .strip_prefix(b"#!")
            .and_then(|rest| rest.split(|b| *b == b'\n').next())
            .map(|line| {
                String::from_utf8_lossy(line)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|w| !w.is_empty());
        Some((real, shebang))
    }
}

/// Runtimes that generate machine code at run time and abort under
/// `MemoryDenyWriteExecute=yes` (measured: Node 20 "Check failed: 12 == errno", SIGTRAP;
/// OpenJDK 17 aborts under the kernel's equivalent). Matched against the program's name
/// with a trailing version (`pypy3`, `node20`, `java17`) ignored.
const JIT_RUNTIMES: &[(&str, &str)] = &[
    ("node", "Node.js (V8)"),
    ("nodejs", "Node.js (V8)"),
    ("npx", "Node.js (V8)"),
    ("npm", "Node.js (V8)"),
    ("pnpm", "Node.js (V8)"),
    ("yarn", "Node.js (V8)"),
    ("pm2", "Node.js (V8)"),
    ("bun", "Bun (JavaScriptCore)"),
    ("deno", "Deno (V8)"),
    ("java", "the JVM"),
    ("kotlin", "the JVM"),
    ("scala", "the JVM"),
    ("clojure", "the JVM"),
    ("jruby", "the JVM"),
    ("dotnet", ".NET (RyuJIT)"),
    ("mono", "Mono"),
    ("pypy", "PyPy"),
    ("luajit", "LuaJIT"),
    ("openresty", "LuaJIT"),
];

/// The JIT runtime a worker command runs, if any: the program's name after resolving
/// symlinks, through `env` (`/usr/bin/env node app.js`) and through a script's `#!` line
/// (`npx`, a `#!/usr/bin/env node` script), or `ruby --yjit` / `php` with `opcache.jit`.
pub fn jit_runtime(command: &[String], host: &dyn Host) -> Option<String> {
    fn base(p: &str) -> &str {
        p.rsplit('/').next().unwrap_or(p)
    }
    fn known(name: &str) -> Option<&'static str> {
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '-');
        JIT_RUNTIMES
            .iter()
            .find(|(n, _)| *n == name || *n == stem)
            .map(|(_, what)| *what)
    }
    // `env [-i] [-S] [VAR=value…] PROGRAM ARGS…`: the program is the first other word.
    fn after_env(words: &[String]) -> &[String] {
        if words.first().is_some_and(|w| base(w) == "env") {
            let skip = words[1..]
                .iter()
                .take_while(|w| w.starts_with('-') || w.contains('='))
                .count();
            &words[1 + skip..]
        } else {
            words
        }
    }
    let mut words: Vec<String> = after_env(command).to_vec();
    for _ in 0..4 {
        let program = words.first()?.clone();
        let args = &words[1..];
        let (real, shebang) = host
            .inspect_program(Path::new(&program))
            .map_or((PathBuf::from(&program), None), |(r, s)| (r, s));
        let real = real.display().to_string();
        for name in [base(&program), base(&real)] {
            if let Some(what) = known(name) {
                return Some(format!("{program} runs {what}"));
            }
        }
        let name = base(&program);
        if name.starts_with("ruby") && args.iter().any(|a| a == "--yjit") {
            return Some(format!("{program} --yjit runs Ruby's YJIT"));
        }
        if name.starts_with("php") && args.iter().any(|a| a.contains("opcache.jit")) {
            return Some(format!("{program} runs PHP with opcache.jit"));
        }
        // A script: look at its interpreter next.
        let interpreter = shebang?;
        words = after_env(&interpreter).to_vec();
    }
    None
}

/// Where a unit's sandbox hides a path: the reason, or `None` when it is visible.
fn hidden_by_sandbox(path: &str, private_tmp: bool, home_unreadable: bool) -> Option<&'static str> {
    let under = |dir: &str| {
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if private_tmp && (under("/tmp") || under("/var/tmp")) {
        return Some("the service gets its own empty /tmp and /var/tmp (PrivateTmp=)");
    }
    if home_unreadable && (under("/root") || under("/home") || under("/run/user")) {
        return Some(
            "home directories are usually closed to other users (mode 0700), and the \
             service runs as a user of its own (DynamicUser=)",
        );
    }
    None
}

/// A path inside a cargo build directory (`…/target/debug/…`, `…/target/release/…`).
fn in_build_dir(path: &str) -> bool {
    // `target/PROFILE/FILE` or `target/TRIPLE/PROFILE/FILE`: a `target` directory with at
    // least a profile directory below it before the file.
    let parts: Vec<&str> = path.split('/').collect();
    parts
        .iter()
        .position(|p| *p == "target")
        .is_some_and(|i| parts.len() >= i + 3)
}

use crate::config::SUN_PATH_MAX;

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
    // The supervisor binds %t/APP/control.sock and %t/APP/notify.PID.sock.
    let runtime = unit_runtime_root(user_units);
    let dir = unit_runtime_dir(app, user_units);
    crate::config::check_socket_paths(Some(&dir.join("control.sock")), Some(&dir)).map_err(|e| {
        let longest =
            SUN_PATH_MAX - runtime.len() - 2 - crate::config::NOTIFY_SOCKET_NAME_MAX.len();
        format!(
            "application name is too long ({} characters; at most {longest} here): {e}",
            app.len()
        )
    })
}

/// `%t`: `/run`, or for user managers `$XDG_RUNTIME_DIR` = `/run/user/UID`, counted with
/// the longest UID.
fn unit_runtime_root(user_units: bool) -> &'static str {
    if user_units {
        "/run/user/4294967295"
    } else {
        "/run"
    }
}

/// The supervisor's `$RUNTIME_DIRECTORY` under the unit (`RuntimeDirectory=APP`).
fn unit_runtime_dir(app: &str, user_units: bool) -> PathBuf {
    PathBuf::from(format!("{}/{app}", unit_runtime_root(user_units)))
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
        let mut notes = Vec::new();
        let mut warnings = Vec::new();
        let app = match args
            .app
            .strip_suffix(".service")
            .or_else(|| args.app.strip_suffix(".socket"))
        {
            Some(stem) if !stem.is_empty() => {
                notes.push(format!(
                    "APP is the name without the suffix: writing {stem}.socket and {stem}.service"
                ));
                stem.to_string()
            }
            _ => args.app.clone(),
        };
        check_app_name(&app, args.user_units).map_err(Error::Config)?;
        let version_arg = args.systemd_version;
        if args.listen.is_empty() {
            return Err(Error::config(
                "at least one --listen is needed: the socket unit holds the listening sockets",
            ));
        }
        // The supervisor will run with $RUNTIME_DIRECTORY=%t/APP and its control socket
        // there (the unit gives no --control).
        let runtime_dir = unit_runtime_dir(&app, args.user_units);
        let control = runtime_dir.join("control.sock");
        let sockets = SocketPaths {
            control: Some(&control),
            runtime_dir: Some(&runtime_dir),
        };
        let opts = Settings::new(&args.opts, &args.listen, sockets).map_err(Error::Config)?;
        let fd_name = socket_name(&args.listen)?;
        warnings.extend(
            args.listen
                .iter()
                .filter_map(ListenSpec::every_interface_warning),
        );

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

        let working_directory = if let Some(p) = &args.working_directory {
            absolute_path("--working-directory", p)?
        } else {
            let dir = absolute_path("the current directory", &host.current_dir()?)?;
            notes.push(format!(
                "WorkingDirectory={dir}: the directory gen-units runs in (give \
                 --working-directory DIR for another)"
            ));
            dir
        };
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

        let jit = jit_runtime(&command, host);
        let hardening = match (args.hardening, &jit) {
            (Some(h), _) => h,
            (None, Some(why)) => {
                notes.push(format!(
                    "--hardening jit: {why}, a JIT compiler that MemoryDenyWriteExecute= \
                     would kill at start; pass --hardening strict to override"
                ));
                Hardening::Jit
            }
            (None, None) => Hardening::Strict,
        };
        if hardening == Hardening::Strict
            && let Some(why) = &jit
        {
            warnings.push(format!(
                "--hardening strict with a JIT runtime ({why}): MemoryDenyWriteExecute=yes \
                 will probably kill it at start; use --hardening jit"
            ));
        }
        let hardening_reason = jit.filter(|_| hardening == Hardening::Jit);

        // Paths the service must reach that its own sandbox hides.
        let private_tmp = !args.user_units
            && (hardening != Hardening::None || matches!(identity, Identity::Dynamic { .. }));
        let home_unreadable = !args.user_units && matches!(identity, Identity::Dynamic { .. });
        let checks = [
            ("ExecStart= runs clusterctl from", clusterctl.as_str(), true),
            ("the worker program is", command[0].as_str(), true),
            ("WorkingDirectory= is", working_directory.as_str(), false),
        ];
        for (what, path, program) in checks {
            let fix = if program {
                format!(
                    "install it where the service can see it, e.g. `install -m 755 {path} \
                     /usr/local/bin/`, and give that path{} (README \"Installing\")",
                    if what.contains("clusterctl") {
                        " with --clusterctl /usr/local/bin/clusterctl"
                    } else {
                        " after --"
                    }
                )
            } else {
                "move the app to e.g. /srv/APP or /opt/APP and pass --working-directory".into()
            };
            if let Some(why) = hidden_by_sandbox(path, private_tmp, home_unreadable) {
                warnings.push(format!(
                    "{what} {path}, which the unit's sandbox hides: {why}. It would fail \
                     under systemd ({}); {fix}",
                    if program { "203/EXEC" } else { "200/CHDIR" }
                ));
            } else if program && in_build_dir(path) {
                warnings.push(format!(
                    "{what} {path}, inside a cargo build directory: the next `cargo build` \
                     or `cargo clean` changes or removes it under the running service; {fix}"
                ));
            }
        }

        Ok(UnitSpec {
            app,
            listen: args.listen.clone(),
            fd_name,
            opts,
            watchdog: args.watchdog,
            identity,
            working_directory,
            environment,
            environment_file,
            hardening,
            hardening_reason,
            systemd_version,
            log_rate_limit: args.log_rate_limit,
            description: args.description.clone(),
            user_units: args.user_units,
            clusterctl,
            command,
            notes,
            warnings,
        })
    }

    /// Whether every socket is TCP (`NoDelay=` is a TCP option).
    pub fn all_tcp(&self) -> bool {
        self.listen
            .iter()
            .all(|l| matches!(l.address, Address::Tcp(_)))
    }

    /// A canonical command line that renders these units again (the header comment):
    /// defaults left out, the version, clusterctl path and worker program resolved, output
    /// options left out. The supervisor's options come from `Settings::to_args`, as in
    /// `ExecStart=`; only gen-units' own options are rendered here.
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
        v.extend(self.opts.to_args());
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
        push(&mut v, "working-directory", &self.working_directory);
        for (k, val) in &self.environment {
            push(&mut v, "environment", &format!("{k}={val}"));
        }
        if let Some(f) = &self.environment_file {
            push(&mut v, "environment-file", f);
        }
        if self.hardening != Hardening::Strict {
            push(&mut v, "hardening", self.hardening.name());
        }
        if let Some(l) = self.log_rate_limit {
            push(&mut v, "log-rate-limit", &l.to_string());
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
        for good in ["demo", "my-app", "my_app.v2", "A1", &"a".repeat(82)] {
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
        // The notify socket (/run/APP/notify.PID.sock) bounds the length well below
        // systemd's 255; names of 83-89 characters used to pass the control socket check.
        for n in 83..=89 {
            let err = check_app_name(&"a".repeat(n), false).unwrap_err();
            assert!(
                err.contains("107") && err.contains("notify socket"),
                "{n}: {err}"
            );
        }
        assert!(check_app_name(&"a".repeat(66), true).is_ok());
        assert!(check_app_name(&"a".repeat(67), true).is_err());
    }

    #[test]
    fn build_directories() {
        assert!(in_build_dir("/src/app/target/release/clusterctl"));
        assert!(in_build_dir(
            "/x/target/x86_64-unknown-linux-gnu/dist/clusterctl"
        ));
        assert!(!in_build_dir("/usr/local/bin/clusterctl"));
        assert!(!in_build_dir("/srv/target"));
        assert!(!in_build_dir("/srv/target/app"));
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
}
