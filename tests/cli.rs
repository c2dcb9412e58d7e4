//! The command line as a newcomer meets it (issues 11 and 12): usage errors exit 2 with a
//! hint that names the fix, configuration errors found before anything starts exit 78,
//! man pages exist for every subcommand, completions offer values.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::cluster::clusterctl;
use crate::support::{free_port, output_with_deadline};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> Output {
    output_with_deadline(
        Command::new(clusterctl())
            .args(args)
            .env_remove("RUNTIME_DIRECTORY"),
        None,
        TIMEOUT,
    )
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn forgetting_the_double_dash_shows_the_corrected_line() {
    let o = run(&["run", "--listen", "8080", "gunicorn", "app:app"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("the worker command goes after `--`"), "{err}");
    assert!(
        err.contains("clusterctl run --listen 8080 -- gunicorn app:app"),
        "{err}"
    );
    let o = run(&[
        "gen-units",
        "web",
        "--listen",
        "8080",
        "--workers",
        "2",
        "/usr/bin/node",
        "app.js",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("clusterctl gen-units web --listen 8080 --workers 2 -- /usr/bin/node app.js"),
        "{err}"
    );
    // A genuinely bad option gets no such hint.
    let o = run(&["run", "--listen", "8080", "--bogus", "--", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("goes after"), "{}", stderr(&o));
}

#[test]
fn usage_errors_exit_2_with_the_right_subcommand() {
    // No APP and no supervisor to be found: usage, with the subcommand named.
    let empty = crate::support::cluster::TempDir::new("cli-noapp");
    for (sub, args) in [
        ("status", &["status"][..]),
        ("reload", &["reload", "--wait"]),
        ("restart", &["restart", "--rolling"]),
    ] {
        let o = output_with_deadline(
            Command::new(clusterctl())
                .args(args)
                .env_remove("RUNTIME_DIRECTORY")
                .env("XDG_RUNTIME_DIR", empty.path())
                .current_dir(empty.path()),
            None,
            TIMEOUT,
        )
        .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("clusterctl {sub} APP")),
            "{args:?}: {err}"
        );
        assert!(err.contains(&format!("clusterctl {sub} --help")), "{err}");
    }
    let o = run(&["scale", "3"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("clusterctl scale APP N"), "{err}");
    let o = run(&["run", "--stop-signal", "NOPE", "--", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown signal"), "{}", stderr(&o));
    assert!(stderr(&o).contains("'--stop-signal'"), "{}", stderr(&o));
}

#[test]
fn run_refuses_impossible_options_with_78() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    for (args, needle) in [
        (
            vec!["--ready", "after:5s", "--ready-timeout", "5s"],
            "can never be reached",
        ),
        (vec!["--ready-timeout", "0"], "--ready-timeout 0"),
        (vec!["--restart-delay", "0..0"], "busy loop"),
        (vec!["--listen", &listen], "listed twice"),
        (
            vec![
                "--control",
                &format!("/tmp/{}/control.sock", "c".repeat(100)),
            ],
            "107",
        ),
    ] {
        let mut argv = vec!["run", "--listen", &listen];
        argv.extend(args.iter().copied());
        argv.extend(["--", "/bin/true"]);
        let o = run(&argv);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(78), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The notify socket in a long $RUNTIME_DIRECTORY is checked before anything is bound.
    let long = format!("/run/{}", "r".repeat(83));
    let o = output_with_deadline(
        Command::new(clusterctl())
            .args(["run", "--listen", &listen, "--", "/bin/true"])
            .env("RUNTIME_DIRECTORY", &long),
        None,
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("notify socket"), "{}", stderr(&o));
}

#[test]
fn listen_errors_name_the_problem() {
    for (spec, needle) in [
        ("localhost:8080", "HOST must be an IP address"),
        ("127.0.0.1:99999", "out of range 1..65535"),
        ("99999", "out of range 1..65535"),
    ] {
        let o = run(&["run", "--listen", spec, "--", "/bin/true"]);
        assert_eq!(o.status.code(), Some(2), "{spec}");
        assert!(stderr(&o).contains(needle), "{spec}: {}", stderr(&o));
    }
}

#[test]
fn a_bare_port_warns_that_it_listens_everywhere() {
    let port = free_port().to_string();
    // The worker fails at once: clusterctl binds, warns, gives up after 3 starts (exit 1).
    let o = run(&[
        "run",
        "--log",
        "stderr",
        "--listen",
        &port,
        "--workers",
        "1",
        "--restart-delay",
        "1ms",
        "--",
        "/bin/false",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("--listen {port} listens on every interface")),
        "{err}"
    );
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    // --help says so too.
    let help = String::from_utf8_lossy(&run(&["run", "--help"]).stdout).into_owned();
    assert!(help.contains("every interface"), "{help}");
}

#[test]
fn listen_fds_naming_a_closed_fd_says_which() {
    // LISTEN_PID must be clusterctl's own pid: `exec` keeps the shell's.
    let script = format!(
        "exec 3</dev/null 4<&-; LISTEN_PID=$$ LISTEN_FDS=2 exec {} run -- /bin/true",
        clusterctl().display()
    );
    let o =
        output_with_deadline(Command::new("/bin/sh").args(["-c", &script]), None, TIMEOUT).unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(err.contains("fd 4 is not open"), "{err}");
}

#[test]
fn inherited_sockets_not_at_fd_3_are_refused() {
    // listenfd would take LISTEN_FDS_FIRST_FD=5 at its word; the workers could not find
    // the socket at fd 3, so clusterctl refuses and says what to do.
    let script = format!(
        "exec 5</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDS_FIRST_FD=5 exec {} run -- \
         /bin/true",
        clusterctl().display()
    );
    let o =
        output_with_deadline(Command::new("/bin/sh").args(["-c", &script]), None, TIMEOUT).unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(
        err.contains("socket 0 is fd 5, not 3") && err.contains("from fd 3 on"),
        "{err}"
    );
}

#[test]
fn every_subcommand_has_a_man_page() {
    let dir = crate::support::cluster::TempDir::new("man");
    let out = dir.path().join("man1");
    let o = run(&["man", "--dir", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let top = std::fs::read_to_string(out.join("clusterctl.1")).unwrap();
    for sub in [
        "run",
        "gen-units",
        "reload",
        "restart",
        "status",
        "scale",
        "logs",
        "man",
        "completions",
    ] {
        let page = out.join(format!("clusterctl-{sub}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(".TH clusterctl-"), "{sub}: {text}");
        // The top page refers to each subcommand's page, which now exists.
        assert!(
            top.contains(&format!("clusterctl\\-{}(1)", sub.replace('-', "\\-"))),
            "top page lacks {sub}"
        );
    }
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert!(mode & 0o700 == 0o700);
    // One page to stdout.
    let o = run(&["man", "gen-units"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("hardening"), "{text}");
}

#[test]
fn completions_offer_values() {
    let o = run(&["completions", "bash"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success());
    for values in [
        "strict jit none",
        "notify exec after:2s",
        "surge rolling",
        "TERM INT QUIT",
    ] {
        assert!(text.contains(values), "bash completion lacks {values:?}");
    }
    let o = run(&["completions", "zsh"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("_files") && text.contains("_cmdambivalent"),
        "zsh paths/commands"
    );
}
