//! Turns a checked `UnitSpec` into the text of APP.socket and APP.service: quotes every value
//! (`quote.rs`), picks the sandboxing settings for the hardening level, systemd version and
//! manager, and fills the askama templates in `templates/`. Rendering either produces both
//! files or an error; nothing here touches the file system.

use askama::Template;

use crate::error::{Error, Result, exit};

use super::quote;
use super::spec::{Identity, UnitSpec};
use crate::cli::Hardening;

/// One rendered unit file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFile {
    /// `APP.socket` or `APP.service`.
    pub name: String,
    pub content: String,
}

/// Both units, rendered.
#[derive(Debug, Clone)]
pub struct Units {
    pub socket: UnitFile,
    pub service: UnitFile,
}

impl Units {
    pub fn files(&self) -> [&UnitFile; 2] {
        [&self.socket, &self.service]
    }
}

/// `Backlog=`: connections wait here while workers are replaced. The kernel caps it at
/// net.core.somaxconn (4096 by default since Linux 5.4), so a larger value gains nothing.
const BACKLOG: u32 = 4096;

/// systemd's longest unit file line (`LONG_LINE_MAX`, 1 MiB).
const LONG_LINE_MAX: usize = 1024 * 1024;

/// A `Key=value` line with an optional comment above it (`\n` separates comment lines).
#[derive(Debug)]
struct Line {
    key: &'static str,
    value: String,
    note: Option<&'static str>,
}

/// Where a sandboxing setting works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// System and user managers: seccomp filters, `NoNewPrivileges=`, `UMask=` need no
    /// privileges.
    Any,
    /// System services only: systemd.exec(5) says "only available for system services"
    /// (or only together with `PrivateUsers=`, which needs unprivileged user namespaces in a
    /// user manager and is not relied upon): namespaces, capabilities, cgroup device policy.
    System,
}

/// One sandboxing setting of `--hardening strict`.
#[derive(Debug)]
struct Rule {
    key: &'static str,
    value: &'static str,
    /// The first systemd version that knows the setting.
    since: u32,
    scope: Scope,
    /// Kept by `--hardening jit`.
    jit: bool,
    note: Option<&'static str>,
}

const fn rule(key: &'static str, value: &'static str, since: u32, scope: Scope) -> Rule {
    Rule {
        key,
        value,
        since,
        scope,
        jit: true,
        note: None,
    }
}

const fn noted(mut r: Rule, note: &'static str) -> Rule {
    r.note = Some(note);
    r
}

/// `--hardening strict` for systemd 252: exposure 1.2 in `systemd-analyze security` (1.1
/// without the `@setuid` line, which gunicorn's workers need).
/// `--hardening jit` leaves out the rules marked `jit: false`: MemoryDenyWriteExecute=
/// (V8 and HotSpot abort without writable+executable memory; checked with the kernel's
/// equivalent PR_SET_MDWE) and ProcSubset=pid (Node's `os.cpus()` is empty without
/// /proc/cpuinfo and /proc/stat). PrivateUsers= stays: V8 and HotSpot JIT run unchanged in
/// a user namespace. What
/// clusterctl itself needs is all allowed: fork/exec, signals and signalfd, prctl, kill of
/// its process groups, AF_UNIX datagrams with SO_PASSCRED (notify socket), a unix stream
/// socket in RuntimeDirectory= (control socket), reading /proc/PID of its own workers.
const SANDBOX: &[Rule] = &[
    rule("NoNewPrivileges", "yes", 0, Scope::Any),
    noted(
        rule("CapabilityBoundingSet", "", 0, Scope::System),
        "No capabilities: systemd binds the sockets, even ports below 1024.",
    ),
    rule("AmbientCapabilities", "", 0, Scope::System),
    rule("PrivateTmp", "yes", 0, Scope::System),
    rule("PrivateDevices", "yes", 0, Scope::System),
    rule("PrivateUsers", "yes", 0, Scope::System),
    rule("PrivateMounts", "yes", 239, Scope::System),
    noted(
        rule("ProtectSystem", "strict", 0, Scope::System),
        "Read-only file system except RuntimeDirectory=; for more, add StateDirectory=\n\
         or ReadWritePaths= in a drop-in.",
    ),
    rule("ProtectHome", "yes", 0, Scope::System),
    rule("ProtectKernelTunables", "yes", 0, Scope::System),
    rule("ProtectKernelModules", "yes", 0, Scope::System),
    rule("ProtectKernelLogs", "yes", 244, Scope::System),
    rule("ProtectControlGroups", "yes", 0, Scope::System),
    rule("ProtectClock", "yes", 245, Scope::System),
    rule("ProtectHostname", "yes", 242, Scope::System),
    rule("ProtectProc", "invisible", 247, Scope::System),
    Rule {
        jit: false,
        ..noted(
            rule("ProcSubset", "pid", 247, Scope::System),
            "Hides /proc/cpuinfo, /proc/meminfo, /proc/stat (Node's os.cpus() returns an\n\
             empty list): --hardening jit leaves it out.",
        )
    },
    noted(
        rule(
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6",
            0,
            Scope::Any,
        ),
        "AF_UNIX: sd_notify, the journal, clusterctl's control socket. Sockets passed in\n\
         by systemd are not affected.",
    ),
    rule("RestrictNamespaces", "yes", 0, Scope::Any),
    rule("RestrictRealtime", "yes", 0, Scope::Any),
    rule("RestrictSUIDSGID", "yes", 242, Scope::Any),
    rule("LockPersonality", "yes", 0, Scope::Any),
    Rule {
        jit: false,
        ..noted(
            rule("MemoryDenyWriteExecute", "yes", 0, Scope::Any),
            "Breaks JIT compilers (Node, the JVM, LuaJIT, PCRE-JIT): use --hardening jit\n\
             for those.",
        )
    },
    rule("RemoveIPC", "yes", 0, Scope::System),
    rule("SystemCallArchitectures", "native", 0, Scope::Any),
    rule("SystemCallFilter", "@system-service", 0, Scope::Any),
    rule("SystemCallFilter", "~@privileged @resources", 0, Scope::Any),
    noted(
        rule("SystemCallFilter", "@setuid", 0, Scope::Any),
        "setuid() and friends back in: pre-forking servers (gunicorn) call them with their\n\
         own ids. No capability is gained (CapabilityBoundingSet= is empty,\n\
         NoNewPrivileges=yes), so they cannot change to another user.",
    ),
    noted(
        rule("SystemCallErrorNumber", "EPERM", 0, Scope::Any),
        "A denied system call fails with EPERM instead of killing the process.",
    ),
    rule("UMask", "0077", 0, Scope::Any),
    rule("DevicePolicy", "closed", 0, Scope::System),
    rule("KeyringMode", "private", 0, Scope::System),
];

/// Directories `ProtectHome=yes` hides.
const HOME_DIRS: &[&str] = &["/home", "/root", "/run/user"];

fn under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The sandboxing lines for this spec.
fn sandbox(spec: &UnitSpec) -> Vec<Line> {
    if spec.hardening == Hardening::None {
        return Vec::new();
    }
    // Programs or a working directory under /home must stay visible (read-only).
    let needs_home = [Some(&spec.clusterctl), spec.command.first()]
        .into_iter()
        .flatten()
        .chain([&spec.working_directory])
        .any(|p| HOME_DIRS.iter().any(|d| under(p, d)));
    SANDBOX
        .iter()
        .filter(|r| r.since <= spec.systemd_version)
        .filter(|r| !spec.user_units || r.scope == Scope::Any)
        .filter(|r| spec.hardening == Hardening::Strict || r.jit)
        .map(|r| {
            if r.key == "ProtectHome" && needs_home {
                Line {
                    key: r.key,
                    value: "read-only".into(),
                    note: Some(
                        "read-only, not yes: the program or working directory is under /home,\n\
                         /root or /run/user.",
                    ),
                }
            } else if r.key == "RestrictAddressFamilies" && spec.opts.exit_idle_after.is_some() {
                Line {
                    key: r.key,
                    value: format!("{} AF_NETLINK", r.value),
                    note: Some(
                        "AF_UNIX: sd_notify, the journal, clusterctl's control socket. AF_NETLINK:\n\
                         --exit-idle-after reads the sockets' queues through sock_diag.",
                    ),
                }
            } else {
                Line {
                    key: r.key,
                    value: r.value.into(),
                    note: r.note,
                }
            }
        })
        .collect()
}

/// `DynamicUser=` or `User=`/`Group=`.
fn identity(spec: &UnitSpec) -> Vec<Line> {
    let line = |key, value: &str, note| Line {
        key,
        value: value.to_string(),
        note,
    };
    match &spec.identity {
        Identity::UserManager => Vec::new(),
        Identity::Dynamic { group } => {
            let mut v = vec![line(
                "DynamicUser",
                "yes",
                Some("A user allocated while the service runs; it owns nothing else."),
            )];
            if let Some(g) = group {
                v.push(line("Group", g, None));
            }
            v
        }
        Identity::Static { user, group } => {
            let mut v = vec![line("User", user, None)];
            if let Some(g) = group {
                v.push(line("Group", g, None));
            }
            v
        }
    }
}

#[derive(Template)]
#[template(path = "app.socket", escape = "none")]
struct SocketTemplate<'a> {
    header: &'a str,
    description: String,
    service: &'a str,
    listen_streams: Vec<String>,
    fd_name: Option<&'a str>,
    backlog: u32,
    no_delay: bool,
    no_delay_left_out: bool,
}

#[derive(Template)]
#[template(path = "app.service", escape = "none")]
struct ServiceTemplate<'a> {
    header: &'a str,
    description: String,
    app: &'a str,
    socket: &'a str,
    exec_start: String,
    exec_reload: String,
    working_directory: String,
    environment: Vec<String>,
    environment_file: Option<String>,
    stop_timeout: String,
    timeout_start: String,
    timeout_start_why: String,
    timeout_stop: String,
    log_rate_limit: Option<(u32, String)>,
    log_rate_limit_known: bool,
    hardening_reason: Option<String>,
    watchdog: Option<String>,
    config_exit: u8,
    identity: Vec<Line>,
    hardening: &'static str,
    user_units: bool,
    sandbox: Vec<Line>,
    wanted_by: &'static str,
}

/// Adds what was being quoted to a quoting error.
fn ctx<T>(what: impl FnOnce() -> String) -> impl FnOnce(String) -> Result<T> {
    move |e| Err(Error::config(format!("{} {e}", what())))
}

/// The `ExecStart=` value: `clusterctl run [options] -- CMD ARGS`.
fn exec_start(spec: &UnitSpec, clusterctl: &str) -> Result<String> {
    let mut words = vec![clusterctl.to_string(), "run".into()];
    for arg in spec.opts.to_args() {
        words.push(quote::exec_arg(&arg).or_else(ctx(|| format!("option {arg:?}")))?);
    }
    words.push("--".into());
    for (i, arg) in spec.command.iter().enumerate() {
        let what = || match i {
            0 => format!("the worker program {arg:?}"),
            _ => format!("argument {i} of the worker command ({arg:?})"),
        };
        words.push(quote::exec_arg(arg).or_else(ctx(what))?);
    }
    let line = words.join(" ");
    if line.len() > LONG_LINE_MAX - "ExecStart=".len() - 1 {
        return Err(Error::config(format!(
            "the worker command is too long for a unit file line ({} bytes, systemd reads at \
             most {LONG_LINE_MAX})",
            line.len()
        )));
    }
    Ok(line)
}

/// The comment lines at the top of both files.
fn header(spec: &UnitSpec) -> Result<String> {
    let words = spec.invocation();
    for w in &words {
        quote::check_text(w).or_else(ctx(|| format!("{w:?}")))?;
    }
    let invocation: Vec<String> = words.iter().map(|w| quote::shell_word(w)).collect();
    Ok(format!(
        "# Generated by clusterctl gen-units from this invocation; regenerate rather than edit\n\
         # (local additions belong in a drop-in: systemctl{user} edit {app}.service):\n\
         #   {invocation}",
        user = if spec.user_units { " --user" } else { "" },
        app = spec.app,
        invocation = invocation.join(" "),
    ))
}

/// Renders both unit files, or explains what cannot be written.
pub fn render(spec: &UnitSpec) -> Result<Units> {
    let app = spec.app.as_str();
    let socket_name = format!("{app}.socket");
    let service_name = format!("{app}.service");
    let header = header(spec)?;

    let description = match &spec.description {
        Some(d) => d.clone(),
        None => format!("{app} (clusterctl)"),
    };
    let service_description =
        quote::literal(&description).or_else(ctx(|| "--description".to_string()))?;
    let socket_description = quote::literal(&format!("{description} - sockets"))
        .or_else(ctx(|| "--description".to_string()))?;

    let listen_streams = spec
        .listen
        .iter()
        .map(|l| quote::literal(&l.listen_stream()).or_else(ctx(|| format!("--listen {}", l.raw))))
        .collect::<Result<Vec<_>>>()?;

    let clusterctl = quote::exec_path(&spec.clusterctl)
        .or_else(ctx(|| format!("--clusterctl {:?}", spec.clusterctl)))?;
    let exec_start = exec_start(spec, &clusterctl)?;
    let exec_reload = format!("{clusterctl} reload --wait --control %t/{app}/control.sock");

    let working_directory = quote::literal(&spec.working_directory)
        .or_else(ctx(|| "--working-directory".to_string()))?;
    let environment_file = spec
        .environment_file
        .as_deref()
        .map(|f| quote::literal(f).or_else(ctx(|| "--environment-file".to_string())))
        .transpose()?;
    let environment = spec
        .environment
        .iter()
        .map(|(k, v)| quote::env_assignment(k, v).or_else(ctx(|| format!("--environment {k}"))))
        .collect::<Result<Vec<_>>>()?;

    let socket = SocketTemplate {
        header: &header,
        description: socket_description,
        service: &service_name,
        listen_streams,
        fd_name: spec.fd_name.as_deref(),
        backlog: BACKLOG,
        no_delay: spec.all_tcp(),
        no_delay_left_out: !spec.all_tcp()
            && spec
                .listen
                .iter()
                .any(|l| matches!(l.address, crate::config::Address::Tcp(_))),
    };
    let service = ServiceTemplate {
        header: &header,
        description: service_description,
        app,
        socket: &socket_name,
        exec_start,
        exec_reload,
        working_directory,
        environment,
        environment_file,
        stop_timeout: spec.opts.stop_timeout.to_string(),
        timeout_start: spec.opts.timeout_start().0.to_string(),
        timeout_start_why: spec.opts.timeout_start().1,
        log_rate_limit: spec
            .log_rate_limit
            .map(|l| (l.burst, l.interval.to_string())),
        log_rate_limit_known: spec.systemd_version >= super::version::LOG_RATE_LIMIT_SINCE,
        hardening_reason: spec.hardening_reason.clone(),
        timeout_stop: spec.opts.timeout_stop().to_string(),
        watchdog: spec.watchdog.map(|w| w.to_string()),
        config_exit: exit::CONFIG,
        identity: identity(spec),
        hardening: spec.hardening.name(),
        user_units: spec.user_units,
        sandbox: sandbox(spec),
        wanted_by: if spec.user_units {
            "default.target"
        } else {
            "multi-user.target"
        },
    };
    let render_err = |e: askama::Error| Error::Failed(format!("rendering the units failed: {e}"));
    Ok(Units {
        socket: UnitFile {
            name: socket_name.clone(),
            content: socket.render().map_err(render_err)? + "\n",
        },
        service: UnitFile {
            name: service_name,
            content: service.render().map_err(render_err)? + "\n",
        },
    })
}
