//! The rules of `Settings::new` (each: the accepted edge, the refused edge, an error that
//! says what to do) and the argv round trip over every clap argument of `run`. That
//! `gen-units` refuses exactly what `run` refuses is tested in `units/mod.rs`.

use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, Parser};

use super::*;
use crate::cli::{Cli, Command};

fn run_args(argv: &[&str]) -> RunArgs {
    let full = ["clusterctl", "run"].iter().chain(argv).copied();
    match Cli::try_parse_from(full).unwrap_or_else(|e| panic!("{argv:?}: {e}")) {
        Cli {
            command: Command::Run(parsed),
        } => parsed,
        _ => unreachable!(),
    }
}

/// `clusterctl run ARGV -- sh` checked, outside systemd.
fn run(argv: &[&str]) -> std::result::Result<RunSettings, String> {
    let mut v = argv.to_vec();
    if !v.contains(&"--") {
        v.extend(["--", "sh"]);
    }
    RunSettings::from_args_in(run_args(&v), None, Some("/bin:/usr/bin".as_ref()))
        .map_err(|e| e.to_string())
}

fn opts(argv: &[&str]) -> SupervisorOpts {
    run_args(&[argv, &["--", "x"]].concat()).opts
}

fn check(argv: &[&str]) -> std::result::Result<Settings, String> {
    Settings::new(&opts(argv), &[], SocketPaths::default())
}

#[test]
fn ready_after_must_be_shorter_than_the_ready_timeout() {
    assert!(check(&["--ready", "after:59s"]).is_ok());
    assert!(check(&["--ready", "after:59999ms", "--ready-timeout", "1min"]).is_ok());
    let e = check(&["--ready", "after:60s"]).unwrap_err();
    assert!(
        e.contains("can never be reached") && e.contains("--ready-timeout 2min10s")
            || e.contains("--ready-timeout 130s"),
        "{e}"
    );
    let e = check(&["--ready", "after:5s", "--ready-timeout", "2s"]).unwrap_err();
    assert!(e.contains("Give --ready-timeout longer"), "{e}");
}

#[test]
fn ready_timeout_and_restart_delay_must_be_positive() {
    assert!(check(&["--ready-timeout", "1ms"]).is_ok());
    let e = check(&["--ready-timeout", "0"]).unwrap_err();
    assert!(e.contains("give a positive duration"), "{e}");
    assert!(check(&["--restart-delay", "0..1ms"]).is_ok());
    let e = check(&["--restart-delay", "0"]).unwrap_err();
    assert!(e.contains("MAX must be above 0"), "{e}");
}

#[test]
fn worker_watchdog_is_at_least_10ms() {
    assert!(check(&["--worker-watchdog", "10ms"]).is_ok());
    let e = check(&["--worker-watchdog", "9ms"]).unwrap_err();
    assert!(
        e.contains("at least 10ms") && e.contains("leave it out"),
        "{e}"
    );
}

#[test]
fn every_own_socket_path_must_fit_sun_path() {
    let o = opts(&[]);
    let at = |control: Option<&str>, dir: Option<&str>| {
        let sockets = SocketPaths {
            control: control.map(Path::new),
            runtime_dir: dir.map(Path::new),
        };
        Settings::new(&o, &[], sockets)
    };
    let control = |n: usize| format!("/{}", "c".repeat(n - 1));
    assert!(at(Some(&control(107)), None).is_ok());
    let e = at(Some(&control(108)), None).unwrap_err();
    assert!(e.contains("control socket") && e.contains("shorter"), "{e}");
    // notify.4194304.sock is 19 bytes: the directory may have 107 - 20.
    let dir = |n: usize| format!("/{}", "d".repeat(n - 1));
    assert!(at(None, Some(&dir(87))).is_ok());
    let e = at(None, Some(&dir(88))).unwrap_err();
    assert!(e.contains("notify socket") && e.contains("shorter"), "{e}");
}

#[test]
fn the_same_listen_address_twice_is_refused() {
    let l = |s: &str| s.parse::<ListenSpec>().unwrap();
    let o = opts(&[]);
    assert!(Settings::new(&o, &[l("80"), l("127.0.0.1:80")], SocketPaths::default()).is_ok());
    let e = Settings::new(&o, &[l("80"), l("web=80")], SocketPaths::default()).unwrap_err();
    assert!(e.contains("give each address once"), "{e}");
}

#[test]
fn timeouts_for_systemd_follow_the_options() {
    let s = check(&[]).unwrap();
    // 3 x (60s + 1s) + 100ms + 200ms backoff + 30s, rounded up.
    assert_eq!(s.timeout_start().0.to_string(), "214s");
    assert!(s.timeout_start().1.contains("--min-uptime 1s"));
    assert_eq!(s.timeout_stop().to_string(), "45s");
    let s = check(&[
        "--min-uptime",
        "0",
        "--ready-timeout",
        "10s",
        "--stop-timeout",
        "5s",
    ]);
    let s = s.unwrap();
    assert_eq!(s.timeout_start().0.to_string(), "61s");
    assert_eq!(s.timeout_stop().to_string(), "20s");
    // A long --min-uptime makes each attempt longer.
    let s = check(&["--min-uptime", "1min", "--ready-timeout", "10s"]).unwrap();
    assert_eq!(s.timeout_start().0.to_string(), "241s");
}

#[test]
fn run_resolves_the_program_once() {
    let s = run(&[]).unwrap();
    assert!(s.program.is_absolute() && s.program.ends_with("sh"));
    assert_eq!(s.command, [OsString::from("sh")]);
    let e = run(&["--", "no-such-program-xyz"]).unwrap_err();
    assert!(e.contains("not found in PATH"), "{e}");
}

/// A value for every argument of `clusterctl run` that is not its default. A new argument
/// without an entry here fails `every_run_argument_round_trips`.
fn sample(id: &str) -> Option<&'static [&'static str]> {
    Some(match id {
        "listen" => &[
            "--listen",
            "web=127.0.0.1:8080",
            "--listen",
            "unix:/tmp/a.sock",
        ],
        "reuse_port" => &["--reuse-port"],
        "workers" => &["--workers", "3"],
        "ready" => &["--ready", "after:2s"],
        "ready_timeout" => &["--ready-timeout", "90s"],
        "restart_delay" => &["--restart-delay", "1s..1min"],
        "stop_signal" => &["--stop-signal", "QUIT"],
        "stop_timeout" => &["--stop-timeout", "5s"],
        "reload_strategy" => &["--reload-strategy", "rolling"],
        "worker_watchdog" => &["--worker-watchdog", "2s"],
        "exit_idle_after" => &["--exit-idle-after", "5min"],
        "min_uptime" => &["--min-uptime", "0"],
        "max_worker_memory" => &["--max-worker-memory", "512M"],
        "max_worker_age" => &["--max-worker-age", "6h±10%"],
        "control" => &["--control", "/tmp/x/control.sock"],
        "lazy" => &["--lazy"],
        "pidfile" => &["--pidfile", "/tmp/x.pid"],
        "log" => &["--log", "stderr"],
        "resume_from" => &["--resume-from", "7"],
        "command" => &["--", "sh", "-c", "exit 0"],
        _ => return None,
    })
}

/// Renders `s` to argv and parses that back.
fn round_trip(s: &RunSettings) -> RunSettings {
    let argv: Vec<OsString> = std::iter::once(OsString::from("clusterctl"))
        .chain(s.to_args())
        .collect();
    let Command::Run(parsed) = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .command
    else {
        unreachable!()
    };
    RunSettings::from_args_in(parsed, None, Some("/bin:/usr/bin".as_ref()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

#[test]
fn every_run_argument_round_trips() {
    let cmd = Cli::command();
    let run_cmd = cmd.find_subcommand("run").unwrap();
    let defaults = run(&[]).unwrap();
    assert_eq!(round_trip(&defaults), defaults);
    assert_eq!(
        defaults.to_args(),
        ["run", "--", "sh"],
        "defaults render nothing"
    );
    let mut all: Vec<&str> = Vec::new();
    let mut ids = Vec::new();
    for arg in run_cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let Some(sample) = sample(id) else {
            panic!("--{id} has no sample in settings/tests.rs: add one, and render it in to_args")
        };
        ids.push(id);
        let s = run(sample).unwrap_or_else(|e| panic!("--{id}: {e}"));
        assert_ne!(s, defaults, "the sample for --{id} is its default");
        assert_eq!(round_trip(&s), s, "--{id} does not survive to_args");
        if id != "command" {
            all.extend_from_slice(sample);
        }
    }
    assert!(ids.len() >= 19, "{ids:?}");
    all.extend_from_slice(sample("command").unwrap());
    let s = run(&all).unwrap();
    assert_eq!(round_trip(&s), s);
}

#[test]
fn exec_start_options_are_rendered_by_settings() {
    let s = check(&[
        "--workers",
        "3",
        "--stop-signal",
        "QUIT",
        "--ready",
        "after:2s",
    ])
    .unwrap();
    assert_eq!(
        s.to_args(),
        [
            "--workers",
            "3",
            "--ready",
            "after:2s",
            "--stop-signal",
            "SIGQUIT"
        ]
    );
}
