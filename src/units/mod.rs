//! `clusterctl gen-units`: renders APP.socket and APP.service so that any network server runs
//! under `clusterctl run` with socket activation, zero-downtime reloads and sandboxing.
//!
//! The flow is check (`spec.rs`) → render both files (`render.rs`, `quote.rs`, `templates/`)
//! → print or write (`output.rs`); any error stops before the first byte is written.
//! `units/` in the repository holds rendered examples that a test keeps in sync.

mod output;
mod quote;
mod render;
mod spec;
#[cfg(test)]
mod unquote;
mod version;

use crate::cli::GenUnitsArgs;
use crate::error::Result;

pub(crate) use quote::shell_word;
pub(crate) use render::Units;
pub(crate) use spec::{Host, System, UnitSpec};

/// Checks and renders both units without writing anything.
#[cfg(test)]
pub fn render_units(args: &GenUnitsArgs, host: &dyn Host) -> Result<Units> {
    Ok(check_and_render(args, host)?.1)
}

fn check_and_render(args: &GenUnitsArgs, host: &dyn Host) -> Result<(UnitSpec, Units)> {
    let spec = UnitSpec::from_args(args, host)?;
    let units = render::render(&spec)?;
    Ok((spec, units))
}

/// Runs `clusterctl gen-units`.
pub fn gen_units(args: &GenUnitsArgs) -> Result<()> {
    let (spec, units) = check_and_render(args, &System)?;
    for n in &spec.notes {
        eprintln!("clusterctl: note: {n}");
    }
    for w in &spec.warnings {
        eprintln!("clusterctl: warning: {w}");
    }
    let files = units.files();
    match &args.output_dir {
        None => {
            print!("{}", output::to_stdout_text(&files));
        }
        Some(dir) => {
            let written = output::write_files(dir, &files, args.force, &spec.app, spec.user_units)?;
            for (path, outcome) in &written {
                let what = match outcome {
                    output::Outcome::Created => "wrote",
                    output::Outcome::Replaced => "replaced",
                    output::Outcome::Unchanged => "unchanged",
                };
                eprintln!("{what} {}", path.display());
            }
            let replaced = written.iter().any(|(_, o)| *o == output::Outcome::Replaced);
            eprint!(
                "{}",
                output::next_steps(&spec.app, dir, spec.user_units, replaced)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::unquote::{parse_command_line, parse_env_line, resolve_literal};
    use super::*;
    use crate::cli::Hardening;
    use crate::config::{LogRateLimit, VersionArg};
    use crate::error::Error;
    use std::ffi::OsString;
    use std::path::PathBuf;

    /// A machine with systemd 252, clusterctl in /usr/bin, and `python3` in /usr/bin.
    struct FakeHost;

    impl Host for FakeHost {
        fn systemd_version(&self) -> Result<u32> {
            Ok(252)
        }
        fn current_exe(&self) -> Result<PathBuf> {
            Ok("/usr/bin/clusterctl".into())
        }
        fn resolve_program(&self, program: &Path) -> Result<PathBuf> {
            if program.is_absolute() {
                Ok(program.into())
            } else if program == Path::new("python3") {
                Ok("/usr/bin/python3".into())
            } else {
                Err(Error::config(format!(
                    "{} not found in PATH",
                    program.display()
                )))
            }
        }
        fn current_dir(&self) -> Result<PathBuf> {
            Ok("/srv/app".into())
        }
        /// `/usr/bin/node` → `/usr/bin/nodejs`; `/usr/bin/npx` is a `#!/usr/bin/env node`
        /// script; `/usr/bin/gunicorn` a Python script; nothing else exists.
        fn inspect_program(&self, program: &Path) -> Option<(PathBuf, Option<Vec<String>>)> {
            let words = |s: &str| Some(s.split(' ').map(str::to_string).collect());
            match program.to_str()? {
                "/usr/bin/node" => Some(("/usr/bin/nodejs".into(), None)),
                "/usr/bin/npx" => Some((program.into(), words("/usr/bin/env node"))),
                "/usr/bin/gunicorn" => Some((program.into(), words("/usr/bin/python3"))),
                "/usr/bin/python3" => Some(("/usr/bin/python3.11".into(), None)),
                _ => None,
            }
        }
    }

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: GenUnitsArgs,
    }

    fn args(argv: &[&str]) -> GenUnitsArgs {
        Wrap::try_parse_from(std::iter::once("gen-units").chain(argv.iter().copied()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
            .args
    }

    fn render(argv: &[&str]) -> Units {
        render_units(&args(argv), &FakeHost).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    fn render_err(argv: &[&str]) -> Error {
        render_units(&args(argv), &FakeHost).expect_err("should fail")
    }

    /// The values of `Key=` lines in a unit file, in order.
    fn values(content: &str, key: &str) -> Vec<String> {
        content
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .collect()
    }

    fn value(content: &str, key: &str) -> Option<String> {
        let v = values(content, key);
        assert!(v.len() <= 1, "{key} appears {} times", v.len());
        v.into_iter().next()
    }

    const BASIC: &[&str] = &["demo", "--listen", "8080", "--", "/srv/worker"];

    #[test]
    fn basic_units() {
        let u = render(BASIC);
        assert_eq!(u.socket.name, "demo.socket");
        assert_eq!(u.service.name, "demo.service");
        let (so, se) = (&u.socket.content, &u.service.content);
        assert_eq!(values(so, "ListenStream"), ["8080"]);
        assert_eq!(value(so, "FileDescriptorName"), None);
        assert_eq!(value(so, "Backlog").as_deref(), Some("4096"));
        assert_eq!(value(so, "NoDelay").as_deref(), Some("true"));
        assert_eq!(value(so, "ReusePort").as_deref(), Some("no"));
        assert_eq!(value(so, "WantedBy").as_deref(), Some("sockets.target"));
        assert_eq!(value(se, "Requires").as_deref(), Some("demo.socket"));
        assert_eq!(value(se, "After").as_deref(), Some("demo.socket"));
        assert_eq!(
            value(se, "ExecStart").as_deref(),
            Some("/usr/bin/clusterctl run -- /srv/worker")
        );
        assert_eq!(value(se, "WorkingDirectory").as_deref(), Some("/srv/app"));
        assert_eq!(value(se, "LogRateLimitIntervalSec").as_deref(), Some("1s"));
        assert_eq!(value(se, "Type").as_deref(), Some("notify"));
        assert!(
            se.contains(
                "214s = 3 start attempts x (--ready-timeout 1min + --min-uptime 1s)\n# + 300ms \
                 backoff"
            ),
            "{se}"
        );
        assert_eq!(value(se, "KillMode").as_deref(), Some("mixed"));
        assert_eq!(value(se, "TimeoutStartSec").as_deref(), Some("214s"));
        assert_eq!(value(se, "TimeoutStopSec").as_deref(), Some("45s"));
        assert_eq!(value(se, "Restart").as_deref(), Some("on-failure"));
        assert_eq!(value(se, "RestartPreventExitStatus").as_deref(), Some("78"));
        assert_eq!(value(se, "NotifyAccess").as_deref(), Some("main"));
        assert_eq!(value(se, "RuntimeDirectory").as_deref(), Some("demo"));
        assert_eq!(value(se, "SyslogIdentifier").as_deref(), Some("demo"));
        assert_eq!(value(se, "DynamicUser").as_deref(), Some("yes"));
        assert_eq!(value(se, "WantedBy").as_deref(), Some("multi-user.target"));
        assert_eq!(value(se, "Also").as_deref(), Some("demo.socket"));
        assert_eq!(
            value(se, "Description").as_deref(),
            Some("demo (clusterctl)")
        );
        for content in [so, se] {
            assert!(content.starts_with("# Generated by clusterctl gen-units"));
            assert!(content.contains(
                "#   clusterctl gen-units demo --listen 8080 --working-directory /srv/app \
                 --systemd-version 252 --clusterctl /usr/bin/clusterctl -- /srv/worker\n"
            ));
            assert!(content.ends_with('\n') && !content.ends_with("\n\n"));
            assert!(!content.contains("\n\n\n"), "{content}");
        }
    }

    #[test]
    fn reload_is_synchronous_on_every_version() {
        for version in ["239", "252", "253", "257"] {
            let u = render(&[
                "demo",
                "--listen",
                "80",
                "--systemd-version",
                version,
                "--",
                "/x",
            ]);
            let se = &u.service.content;
            assert_eq!(value(se, "Type").as_deref(), Some("notify"), "{version}");
            assert_eq!(
                value(se, "ExecReload").as_deref(),
                Some("/usr/bin/clusterctl reload --wait --control %t/demo/control.sock"),
                "{version}"
            );
            assert!(!se.contains("\nType=notify-reload"), "{version}");
            assert_eq!(value(se, "ReloadSignal"), None);
        }
        // auto asks the host (252 here).
        let auto = render(&["demo", "--listen", "80", "--", "/x"]);
        assert!(auto.service.content.contains("--systemd-version 252"));
        // The control socket path resolves to the supervisor's $RUNTIME_DIRECTORY.
        let reload = value(&auto.service.content, "ExecReload").unwrap();
        assert_eq!(
            parse_command_line(&reload).unwrap(),
            [
                "/usr/bin/clusterctl",
                "reload",
                "--wait",
                "--control",
                "/run/demo/control.sock"
            ]
        );
    }

    #[test]
    fn journald_rate_limit() {
        let off = render(BASIC).service.content;
        // Not `0`: systemd treats a zero interval as unset and applies journald's default.
        assert_eq!(
            value(&off, "LogRateLimitIntervalSec").as_deref(),
            Some("1s")
        );
        assert_eq!(value(&off, "LogRateLimitBurst").as_deref(), Some("1000000"));
        let on = render(&[
            "demo",
            "--listen",
            "80",
            "--log-rate-limit",
            "10000/30s",
            "--",
            "/x",
        ]);
        let on = on.service.content;
        assert_eq!(
            value(&on, "LogRateLimitIntervalSec").as_deref(),
            Some("30s")
        );
        assert_eq!(value(&on, "LogRateLimitBurst").as_deref(), Some("10000"));
        assert!(on.contains("--log-rate-limit 10000/30s --systemd-version"));
        // systemd 239 does not know the settings.
        let old = render(&[
            "demo",
            "--listen",
            "80",
            "--systemd-version",
            "239",
            "--",
            "/x",
        ]);
        assert_eq!(value(&old.service.content, "LogRateLimitIntervalSec"), None);
        for bad in ["0/30s", "10/0", "10", "x/1s"] {
            assert!(bad.parse::<LogRateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn jit_runtimes_pick_jit() {
        for cmd in [
            &["/usr/bin/node", "app.js"][..],
            &[
                "/usr/bin/env",
                "NODE_ENV=production",
                "/usr/bin/node",
                "app.js",
            ],
            &["/usr/bin/npx", "next", "start"],
            &["/opt/java17/bin/java", "-jar", "app.jar"],
            &["/usr/bin/dotnet", "app.dll"],
            &["/usr/local/bin/bun", "run", "x.ts"],
            &["/usr/bin/pypy3", "app.py"],
            &["/usr/bin/ruby3.2", "--yjit", "app.rb"],
        ] {
            let mut argv = vec!["demo", "--listen", "80", "--"];
            argv.extend_from_slice(cmd);
            let a = args(&argv);
            let spec = UnitSpec::from_args(&a, &FakeHost).unwrap();
            assert_eq!(spec.hardening, Hardening::Jit, "{cmd:?}");
            assert!(
                spec.notes.iter().any(|n| n.contains("--hardening jit")),
                "{cmd:?}"
            );
            let se = render::render(&spec).unwrap().service.content;
            assert_eq!(value(&se, "MemoryDenyWriteExecute"), None, "{cmd:?}");
            assert!(se.contains("# jit, not strict: "), "{cmd:?}");
            assert!(se.contains("--hardening jit"), "{cmd:?}");
        }
        // Not JIT runtimes: strict.
        for cmd in [
            &["/usr/bin/gunicorn", "app:app"][..],
            &["python3", "-m", "x"],
            &["/srv/node-exporter"],
        ] {
            let mut argv = vec!["demo", "--listen", "80", "--"];
            argv.extend_from_slice(cmd);
            let spec = UnitSpec::from_args(&args(&argv), &FakeHost).unwrap();
            assert_eq!(spec.hardening, Hardening::Strict, "{cmd:?}");
        }
        // --hardening overrides, with a warning for strict.
        let a = args(&[
            "demo",
            "--listen",
            "80",
            "--hardening",
            "strict",
            "--",
            "/usr/bin/node",
        ]);
        let spec = UnitSpec::from_args(&a, &FakeHost).unwrap();
        assert_eq!(spec.hardening, Hardening::Strict);
        assert!(
            spec.warnings.iter().any(|w| w.contains("JIT")),
            "{:?}",
            spec.warnings
        );
        let a = args(&[
            "demo",
            "--listen",
            "80",
            "--hardening",
            "none",
            "--",
            "/usr/bin/node",
        ]);
        assert_eq!(
            UnitSpec::from_args(&a, &FakeHost).unwrap().hardening,
            Hardening::None
        );
    }

    #[test]
    fn hidden_programs_and_directories_warn() {
        let warn = |argv: &[&str]| {
            UnitSpec::from_args(&args(argv), &FakeHost)
                .unwrap()
                .warnings
        };
        let w = warn(&[
            "demo",
            "--listen",
            "127.0.0.1:80",
            "--clusterctl",
            "/tmp/c/target/release/clusterctl",
            "--",
            "/x",
        ]);
        assert!(
            w.len() == 1 && w[0].contains("PrivateTmp=") && w[0].contains("203/EXEC"),
            "{w:?}"
        );
        assert!(
            w[0].contains("/usr/local/bin") && w[0].contains("Installing"),
            "{w:?}"
        );
        let w = warn(&[
            "demo",
            "--listen",
            "127.0.0.1:80",
            "--clusterctl",
            "/opt/c/target/debug/clusterctl",
            "--",
            "/x",
        ]);
        assert!(
            w.len() == 1 && w[0].contains("cargo build directory"),
            "{w:?}"
        );
        let w = warn(&["demo", "--listen", "127.0.0.1:80", "--", "/root/app/server"]);
        assert!(w.len() == 1 && w[0].contains("DynamicUser="), "{w:?}");
        let w = warn(&[
            "demo",
            "--listen",
            "127.0.0.1:80",
            "--working-directory",
            "/var/tmp/app",
            "--",
            "/x",
        ]);
        assert!(w.len() == 1 && w[0].contains("200/CHDIR"), "{w:?}");
        // A user's own service sees its home and /tmp.
        let w = warn(&[
            "demo",
            "--listen",
            "127.0.0.1:80",
            "--user-units",
            "--working-directory",
            "/home/me",
            "--",
            "/tmp/x",
        ]);
        assert!(w.is_empty(), "{w:?}");
        // Nothing to say about installed programs.
        assert!(warn(&["demo", "--listen", "127.0.0.1:8080", "--", "/srv/worker"]).is_empty());
    }

    #[test]
    fn a_bare_port_or_any_address_warns_that_it_listens_everywhere() {
        let warnings = |listen: &str| {
            UnitSpec::from_args(&args(&["demo", "--listen", listen, "--", "/x"]), &FakeHost)
                .unwrap()
                .warnings
        };
        for listen in ["8080", "0.0.0.0:8080", "[::]:8080", "web=8080"] {
            let w = warnings(listen);
            assert!(
                w.iter().any(|w| w.contains("listens on every interface")
                    && w.contains("--listen 127.0.0.1:8080")),
                "{listen}: {w:?}"
            );
        }
        for listen in ["127.0.0.1:8080", "[::1]:8080", "unix:/run/demo.sock"] {
            assert!(
                !warnings(listen)
                    .iter()
                    .any(|w| w.contains("every interface")),
                "{listen}"
            );
        }
    }

    #[test]
    fn app_suffix_and_working_directory_defaults() {
        let a = args(&["demo.service", "--listen", "80", "--", "/x"]);
        let spec = UnitSpec::from_args(&a, &FakeHost).unwrap();
        assert_eq!(spec.app, "demo");
        assert!(spec.notes.iter().any(|n| n.contains("demo.service")));
        assert!(
            spec.notes
                .iter()
                .any(|n| n.contains("WorkingDirectory=/srv/app"))
        );
        let u = render(&["x.socket", "--listen", "80", "--", "/x"]);
        assert_eq!(u.service.name, "x.service");
        let u = render(&[
            "demo",
            "--listen",
            "80",
            "--working-directory",
            "/opt/d",
            "--",
            "/x",
        ]);
        assert_eq!(
            value(&u.service.content, "WorkingDirectory").as_deref(),
            Some("/opt/d")
        );
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        for argv in [
            &["demo", "--listen", "80", "--hardening", "bogus", "--", "/x"][..],
            &[
                "demo",
                "--listen",
                "80",
                "--systemd-version",
                "238",
                "--",
                "/x",
            ],
            &[
                "demo",
                "--listen",
                "80",
                "--systemd-version",
                "new",
                "--",
                "/x",
            ],
            &["demo", "--listen", "localhost:80", "--", "/x"],
        ] {
            let e = Wrap::try_parse_from(std::iter::once("gen-units").chain(argv.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{argv:?} parsed"));
            assert_eq!(e.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn idle_exit_allows_netlink_for_sock_diag() {
        let plain = render(&["demo", "--listen", "80", "--", "/x"]);
        assert_eq!(
            value(&plain.service.content, "RestrictAddressFamilies").as_deref(),
            Some("AF_UNIX AF_INET AF_INET6")
        );
        let idle = render(&[
            "demo",
            "--listen",
            "80",
            "--exit-idle-after",
            "5min",
            "--",
            "/x",
        ]);
        assert_eq!(
            value(&idle.service.content, "RestrictAddressFamilies").as_deref(),
            Some("AF_UNIX AF_INET AF_INET6 AF_NETLINK")
        );
        assert!(
            value(&idle.service.content, "ExecStart")
                .unwrap()
                .contains("--exit-idle-after 5min")
        );
    }

    #[test]
    fn supervisor_options_reach_exec_start() {
        let u = render(&[
            "demo",
            "--listen",
            "80",
            "--workers",
            "3",
            "--ready",
            "after:2s",
            "--ready-timeout",
            "2min",
            "--restart-delay",
            "1s..1min",
            "--stop-signal",
            "QUIT",
            "--stop-timeout",
            "5s",
            "--",
            "/x",
        ]);
        let se = &u.service.content;
        assert_eq!(
            value(se, "ExecStart").as_deref(),
            Some(
                "/usr/bin/clusterctl run --workers 3 --ready after:2s --ready-timeout 2min \
                 --restart-delay 1s..1min --stop-signal SIGQUIT --stop-timeout 5s -- /x"
            )
        );
        assert_eq!(value(se, "TimeoutStartSec").as_deref(), Some("396s"));
        assert_eq!(value(se, "TimeoutStopSec").as_deref(), Some("20s"));
        // A readiness delay as long as the timeout can never be reached: refused.
        let err = render_err(&[
            "demo",
            "--listen",
            "80",
            "--ready",
            "after:2min",
            "--",
            "/x",
        ]);
        assert!(err.to_string().contains("--ready-timeout"), "{err}");
        assert_eq!(err.exit_code(), crate::error::exit::CONFIG);
    }

    #[test]
    fn options_map_to_directives() {
        let u = render(&[
            "demo",
            "--listen",
            "web=127.0.0.1:80",
            "--listen",
            "web=[::1]:80",
            "--watchdog",
            "30s",
            "--user",
            "www-data",
            "--group",
            "www-data",
            "--working-directory",
            "/srv/my app",
            "--environment",
            "A=1",
            "--environment",
            "B=say \"hi\" 100%",
            "--environment-file",
            "/etc/demo.env",
            "--description",
            "Demo 100% \"web\"",
            "--",
            "python3",
            "-m",
            "demo",
        ]);
        let (so, se) = (&u.socket.content, &u.service.content);
        assert_eq!(values(so, "ListenStream"), ["127.0.0.1:80", "[::1]:80"]);
        assert_eq!(value(so, "FileDescriptorName").as_deref(), Some("web"));
        assert_eq!(value(se, "WatchdogSec").as_deref(), Some("30s"));
        assert_eq!(value(se, "User").as_deref(), Some("www-data"));
        assert_eq!(value(se, "Group").as_deref(), Some("www-data"));
        assert_eq!(value(se, "DynamicUser"), None);
        assert_eq!(
            value(se, "WorkingDirectory").as_deref(),
            Some("/srv/my app")
        );
        assert_eq!(
            value(se, "EnvironmentFile").as_deref(),
            Some("/etc/demo.env")
        );
        let env: Vec<String> = values(se, "Environment")
            .iter()
            .flat_map(|l| parse_env_line(l).unwrap())
            .collect();
        assert_eq!(env, ["A=1", "B=say \"hi\" 100%"]);
        let desc = value(se, "Description").unwrap();
        assert_eq!(resolve_literal(&desc).unwrap(), "Demo 100% \"web\"");
        let exec = value(se, "ExecStart").unwrap();
        assert_eq!(
            parse_command_line(&exec).unwrap(),
            [
                "/usr/bin/clusterctl",
                "run",
                "--",
                "/usr/bin/python3",
                "-m",
                "demo"
            ]
        );
        // Group alone keeps the dynamic user.
        let u = render(&["demo", "--listen", "80", "--group", "web", "--", "/x"]);
        assert_eq!(
            value(&u.service.content, "DynamicUser").as_deref(),
            Some("yes")
        );
        assert_eq!(value(&u.service.content, "Group").as_deref(), Some("web"));
    }

    #[test]
    fn unix_and_mixed_sockets() {
        let u = render(&["demo", "--listen", "unix:/run/demo 100%.sock", "--", "/x"]);
        let so = &u.socket.content;
        assert_eq!(values(so, "ListenStream"), ["/run/demo 100%%.sock"]);
        assert_eq!(value(so, "NoDelay"), None);
        assert!(!so.contains("NoDelay= is left out"));
        let u = render(&[
            "demo",
            "--listen",
            "80",
            "--listen",
            "unix:/run/d.sock",
            "--",
            "/x",
        ]);
        assert_eq!(value(&u.socket.content, "NoDelay"), None);
        assert!(u.socket.content.contains("NoDelay= is left out"));
    }

    #[test]
    fn hardening_levels() {
        let strict = render(BASIC).service.content;
        for key in [
            "NoNewPrivileges",
            "CapabilityBoundingSet",
            "AmbientCapabilities",
            "PrivateTmp",
            "PrivateDevices",
            "PrivateUsers",
            "PrivateMounts",
            "ProtectSystem",
            "ProtectHome",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "ProtectClock",
            "ProtectHostname",
            "ProtectProc",
            "ProcSubset",
            "RestrictAddressFamilies",
            "RestrictNamespaces",
            "RestrictRealtime",
            "RestrictSUIDSGID",
            "LockPersonality",
            "MemoryDenyWriteExecute",
            "RemoveIPC",
            "SystemCallArchitectures",
            "SystemCallErrorNumber",
            "UMask",
            "DevicePolicy",
            "KeyringMode",
        ] {
            assert!(!values(&strict, key).is_empty(), "strict lacks {key}");
        }
        assert_eq!(values(&strict, "CapabilityBoundingSet"), [""]);
        assert_eq!(
            values(&strict, "SystemCallFilter"),
            ["@system-service", "~@privileged @resources", "@setuid"]
        );
        assert_eq!(value(&strict, "ProtectHome").as_deref(), Some("yes"));
        assert_eq!(value(&strict, "IPAddressDeny"), None);
        assert_eq!(value(&strict, "PrivateNetwork"), None);

        let jit = render(&["demo", "--listen", "80", "--hardening", "jit", "--", "/x"]);
        let jit = jit.service.content;
        assert_eq!(value(&jit, "MemoryDenyWriteExecute"), None);
        assert_eq!(value(&jit, "ProcSubset"), None);
        assert_eq!(value(&jit, "PrivateUsers").as_deref(), Some("yes"));
        let strict_keys = strict
            .lines()
            .filter(|l| l.contains('=') && !l.starts_with('#'));
        let jit_keys: Vec<&str> = jit.lines().collect();
        for line in strict_keys {
            if !line.starts_with("MemoryDenyWriteExecute=")
                && !line.starts_with("ProcSubset=")
                && !line.starts_with("ExecStart=")
                && !line.starts_with("ExecReload=")
            {
                assert!(jit_keys.contains(&line), "jit lacks {line}");
            }
        }

        let none = render(&["demo", "--listen", "80", "--hardening", "none", "--", "/x"]);
        let none = none.service.content;
        assert_eq!(value(&none, "NoNewPrivileges"), None);
        assert_eq!(value(&none, "SystemCallFilter"), None);
        assert!(!none.contains("Sandboxing"));
        assert_eq!(value(&none, "DynamicUser").as_deref(), Some("yes"));
    }

    #[test]
    fn protect_home_follows_paths() {
        for path_args in [
            &["--", "/home/me/server"][..],
            &["--working-directory", "/root/app", "--", "/x"],
            &["--clusterctl", "/home/me/bin/clusterctl", "--", "/x"],
        ] {
            let mut argv = vec!["demo", "--listen", "80"];
            argv.extend_from_slice(path_args);
            let u = render(&argv);
            assert_eq!(
                value(&u.service.content, "ProtectHome").as_deref(),
                Some("read-only"),
                "{argv:?}"
            );
        }
        let u = render(&["demo", "--listen", "80", "--", "/homeless/x"]);
        assert_eq!(
            value(&u.service.content, "ProtectHome").as_deref(),
            Some("yes")
        );
    }

    #[test]
    fn older_systemd_gets_only_known_settings() {
        let u = render(&[
            "demo",
            "--listen",
            "80",
            "--systemd-version",
            "243",
            "--",
            "/x",
        ]);
        let se = &u.service.content;
        for key in [
            "ProtectProc",
            "ProcSubset",
            "ProtectClock",
            "ProtectKernelLogs",
        ] {
            assert_eq!(value(se, key), None, "{key} is newer than 243");
        }
        for key in ["ProtectHostname", "RestrictSUIDSGID", "PrivateMounts"] {
            assert!(value(se, key).is_some(), "{key} exists in 243");
        }
    }

    #[test]
    fn user_units() {
        let u = render(&["demo", "--listen", "8080", "--user-units", "--", "/x"]);
        let se = &u.service.content;
        assert_eq!(value(se, "WantedBy").as_deref(), Some("default.target"));
        assert_eq!(
            value(&u.socket.content, "WantedBy").as_deref(),
            Some("sockets.target")
        );
        for absent in [
            "DynamicUser",
            "User",
            "Group",
            "PrivateUsers",
            "PrivateTmp",
            "ProtectSystem",
            "ProtectHome",
            "ProtectProc",
            "ProcSubset",
            "ProtectControlGroups",
            "RemoveIPC",
            "CapabilityBoundingSet",
            "DevicePolicy",
            "KeyringMode",
            "PrivateDevices",
        ] {
            assert_eq!(
                value(se, absent),
                None,
                "{absent} does not work in user units"
            );
        }
        for present in [
            "NoNewPrivileges",
            "RestrictAddressFamilies",
            "RestrictNamespaces",
            "MemoryDenyWriteExecute",
            "SystemCallArchitectures",
            "LockPersonality",
            "UMask",
        ] {
            assert!(
                value(se, present).is_some(),
                "{present} works in user units"
            );
        }
        assert!(se.contains("systemd-analyze security --user demo.service"));
        assert!(se.contains("systemctl --user edit demo.service"));
        // %t is $XDG_RUNTIME_DIR there, as is RuntimeDirectory=.
        assert!(se.contains("--control %t/demo/control.sock"));
        let err = render_err(&[
            "demo",
            "--listen",
            "80",
            "--user-units",
            "--user",
            "x",
            "--",
            "/x",
        ]);
        assert!(matches!(err, Error::Config(_)));
    }

    #[test]
    fn awkward_arguments_arrive_unchanged() {
        let awkward = [
            "",
            "two words",
            "100%",
            "%n",
            "$HOME",
            "${HOME}",
            "a\"b",
            "it's",
            "back\\slash",
            ";",
            "naïve 日本",
            "--flag=a b",
            "\\;",
        ];
        let mut argv = vec!["demo", "--listen", "80", "--", "/srv/worker"];
        argv.extend_from_slice(&awkward);
        let u = render(&argv);
        let exec = value(&u.service.content, "ExecStart").unwrap();
        let parsed = parse_command_line(&exec).unwrap();
        assert_eq!(parsed[..3], ["/usr/bin/clusterctl", "run", "--"]);
        assert_eq!(parsed[3], "/srv/worker");
        assert_eq!(parsed[4..], awkward);
    }

    #[test]
    fn bad_input_is_a_config_error() {
        let cases: &[(&[&str], &str)] = &[
            (&["a@b", "--listen", "80", "--", "/x"], "template"),
            (&["demo", "--listen", "80", "--", "/x", "a\nb"], "newline"),
            (&["demo", "--listen", "80", "--", "/x", "a\tb"], "tab"),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--description",
                    "a\nb",
                    "--",
                    "/x",
                ],
                "newline",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--environment",
                    "A=x\ny",
                    "--",
                    "/x",
                ],
                "newline",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--environment",
                    "1A=x",
                    "--",
                    "/x",
                ],
                "variable name",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--environment",
                    "NOVALUE",
                    "--",
                    "/x",
                ],
                "KEY=VALUE",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--working-directory",
                    "rel",
                    "--",
                    "/x",
                ],
                "absolute",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--environment-file",
                    "/a/../b",
                    "--",
                    "/x",
                ],
                "..",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--clusterctl",
                    "bin/clusterctl",
                    "--",
                    "/x",
                ],
                "absolute",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--clusterctl",
                    "/opt/a'b",
                    "--",
                    "/x",
                ],
                "'",
            ),
            (&["demo", "--listen", "80", "--", "not-in-path"], "PATH"),
            (
                &["demo", "--listen", "80", "--listen", "80", "--", "/x"],
                "twice",
            ),
            (
                &["demo", "--listen", "a=80", "--listen", "b=81", "--", "/x"],
                "FileDescriptorName",
            ),
            (
                &["demo", "--listen", "80", "--watchdog", "0", "--", "/x"],
                "watchdog",
            ),
            (
                &["demo", "--listen", "80", "--user", "9bad name", "--", "/x"],
                "--user",
            ),
            (
                &["demo", "--listen", "80", "--ready-timeout", "0", "--", "/x"],
                "--ready-timeout 0",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--restart-delay",
                    "0..0",
                    "--",
                    "/x",
                ],
                "busy loop",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--ready",
                    "after:1min",
                    "--",
                    "/x",
                ],
                "can never be reached",
            ),
            (
                &[
                    "demo",
                    "--listen",
                    "80",
                    "--description",
                    "ends\\",
                    "--",
                    "/x",
                ],
                "backslash",
            ),
        ];
        for (argv, needle) in cases {
            let err = render_err(argv);
            assert!(matches!(err, Error::Config(_)), "{argv:?}: {err:?}");
            assert!(err.to_string().contains(needle), "{argv:?}: {err}");
            assert_eq!(err.exit_code(), crate::error::exit::CONFIG);
        }
    }

    #[test]
    fn long_names_are_refused_for_the_notify_socket() {
        let long = "a".repeat(83);
        let err = render_err(&[&long, "--listen", "80", "--", "/x"]);
        assert!(err.to_string().contains("notify socket"), "{err}");
        assert!(err.to_string().contains("at most 82"), "{err}");
        assert_eq!(err.exit_code(), crate::error::exit::CONFIG);
        render(&[&"a".repeat(82), "--listen", "80", "--", "/x"]);
    }

    #[test]
    fn non_utf8_argument_is_refused() {
        use std::os::unix::ffi::OsStringExt;
        let mut a = args(BASIC);
        a.command.push(OsString::from_vec(b"caf\xe9".to_vec()));
        let err = render_units(&a, &FakeHost).unwrap_err();
        assert!(
            err.to_string().contains("argument 1 of the worker command"),
            "{err}"
        );
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn no_files_written_on_error() {
        let dir = std::env::temp_dir().join(format!("clusterctl-gen-err-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_str().unwrap();
        for argv in [
            &["demo", "--listen", "80", "-o", d, "--", "/x", "a\nb"][..],
            &["a@b", "--listen", "80", "-o", d, "--", "/x"],
            &[
                "demo",
                "--listen",
                "80",
                "--ready-timeout",
                "0",
                "-o",
                d,
                "--",
                "/x",
            ],
        ] {
            // gen_units uses the real host; these fail before it is asked anything.
            let mut a = args(argv);
            a.systemd_version = VersionArg::Fixed(252);
            a.clusterctl = Some("/usr/bin/clusterctl".into());
            assert!(gen_units(&a).is_err(), "{argv:?}");
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{argv:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The units' `ExecStart=` is only ever `run` with these options: `gen-units` and `run`
    /// must refuse the same combinations, with the same words.
    #[test]
    fn gen_units_refuses_exactly_what_run_refuses() {
        let cases: &[&[&str]] = &[
            &[],
            &["--ready", "after:1min"],
            &["--ready", "after:59s"],
            &["--ready-timeout", "0"],
            &["--restart-delay", "0"],
            &["--worker-watchdog", "9ms"],
            &["--worker-watchdog", "10ms"],
            &["--listen", "80", "--listen", "[::]:80"],
        ];
        for case in cases {
            let listen = if case.contains(&"--listen") {
                vec![]
            } else {
                vec!["--listen", "80"]
            };
            let argv = [&["demo"][..], &listen, case, &["--", "/bin/sh"]].concat();
            let by_gen_units = UnitSpec::from_args(&args(&argv), &FakeHost)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let run_argv = [
                &["clusterctl", "run"][..],
                &listen,
                case,
                &["--", "/bin/sh"],
            ]
            .concat();
            let crate::cli::Command::Run(parsed) =
                crate::cli::Cli::try_parse_from(&run_argv).unwrap().command
            else {
                unreachable!()
            };
            let by_run = crate::settings::RunSettings::from_args_in(parsed, None, None)
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert_eq!(by_gen_units, by_run, "{case:?}");
        }
    }
}
