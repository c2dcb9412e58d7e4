//! The Debian package (`scripts/build-deb.sh`) inside a real systemd (see
//! `support::systemd`): `dpkg -i` into the throw-away instance, the README's "Under
//! systemd" steps with the packaged `/usr/bin/clusterctl` as gen-units' default
//! `--clusterctl`, the man pages and shell completions where `man` and the shells look for
//! them, and `apt-get remove` leaving none of the package's files behind.
//!
//! The package is built by running `scripts/build-deb.sh` (which `scripts/test.sh` runs
//! before the tests, so here it only re-packages: a no-op cargo build, about 2 s). Run on
//! its own it may first build the dist binary and install cargo-deb (minutes, once).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::support::cluster::{example, http_get, wait_for};
use crate::support::free_port;
use crate::support::output_with_deadline;
use crate::support::systemd::{Systemd, Version};

const SECS: fn(u64) -> Duration = Duration::from_secs;
/// A cold build (cargo-deb install + fat-LTO dist build) on a loaded 2-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const APP: &str = "pkgapp";

/// Builds the package with `scripts/build-deb.sh` once per test process; returns its
/// host path.
fn build_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(build_deb_now).clone()
}

fn build_deb_now() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let out = output_with_deadline(
        Command::new("bash").arg(root.join("scripts/build-deb.sh")),
        None,
        BUILD_TIMEOUT,
    )
    .expect("running scripts/build-deb.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/build-deb.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    eprintln!(
        "package: {} built in {} ms ({})",
        deb.display(),
        started.elapsed().as_millis(),
        stderr.trim_end()
    );
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .expect("running dpkg --print-architecture");
    let arch = String::from_utf8_lossy(&arch.stdout);
    let expected = format!(
        "clusterctl_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    );
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(expected.as_str()),
        "the package's name"
    );
    assert!(deb.is_file(), "{} does not exist", deb.display());
    deb
}

/// True if `path` exists inside the instance (as anything, symlinks included).
fn exists_inside(sd: &Systemd, path: &str) -> bool {
    sd.run(&["/bin/sh", "-c", r#"[ -e "$1" ] || [ -L "$1" ]"#, "sh", path])
        .status
        .success()
}

/// The workers that answer `/` on `port` (as `pid=N generation=G`), over up to 400
/// requests.
fn answering(port: u16, want: usize) -> std::collections::HashSet<String> {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        if let Ok(body) = http_get(port, "/") {
            let words: Vec<&str> = body.split_whitespace().collect();
            let pid = words.iter().find(|w| w.starts_with("pid="));
            let generation = words.iter().find(|w| w.starts_with("generation="));
            if let (Some(pid), Some(generation)) = (pid, generation) {
                seen.insert(format!("{pid} {generation}"));
            }
        }
        if seen.len() >= want {
            break;
        }
    }
    seen
}

/// What the package contains, per `dpkg-deb --contents`: (files, directories), as
/// absolute paths without a trailing slash (symlinks count as files).
fn package_contents(sd: &Systemd, deb_inside: &str) -> (Vec<String>, Vec<String>) {
    let listing = sd.run_ok(&["dpkg-deb", "--contents", deb_inside]);
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(mode), Some(path)) = (fields.first(), fields.get(5)) else {
            panic!("unexpected `dpkg-deb --contents` line: {line:?}");
        };
        let path = path.trim_start_matches('.').trim_end_matches('/');
        if path.is_empty() {
            continue;
        }
        if mode.starts_with('d') {
            dirs.push(path.to_owned());
        } else {
            files.push(path.to_owned());
        }
    }
    (files, dirs)
}

/// The subcommands `clusterctl --help` lists (without clap's `help`).
fn subcommands(sd: &Systemd) -> Vec<String> {
    let help = sd.run_ok(&["clusterctl", "--help"]);
    let subs: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(
        subs.len() >= 5,
        "no subcommands in `clusterctl --help`:\n{help}"
    );
    subs
}

/// Man pages: `man -w` resolves every page the package ships (when man-db is there), and
/// each is a gzipped roff page for its own name.
fn check_man_pages(sd: &Systemd, files: &[String]) {
    let pages: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("/usr/share/man/man1/") && f.ends_with(".1.gz"))
        .collect();
    assert!(
        pages.contains(&&"/usr/share/man/man1/clusterctl.1.gz".to_owned()),
        "no clusterctl.1.gz among {files:?}"
    );
    // A binary whose `man` writes one page per subcommand (`--dir`) ships them all.
    if sd
        .run_ok(&["clusterctl", "man", "--help"])
        .contains("--dir")
    {
        for sub in subcommands(sd) {
            let page = format!("/usr/share/man/man1/clusterctl-{sub}.1.gz");
            assert!(pages.contains(&&page), "no {page} among {files:?}");
        }
    }
    let has_man = exists_inside(sd, "/usr/bin/man");
    for page in pages {
        let name = page
            .trim_start_matches("/usr/share/man/man1/")
            .trim_end_matches(".1.gz");
        let roff = sd.run_ok(&["zcat", page]);
        assert!(
            roff.contains(&format!(".TH {name} 1")),
            "{page} is not the man page of {name}:\n{}",
            &roff[..roff.len().min(300)]
        );
        if has_man {
            let found = sd.run_ok(&["man", "-w", name]);
            assert_eq!(found.trim_end(), page.as_str(), "man -w {name}");
        }
    }
    if has_man {
        let text = sd.run_ok(&["/bin/sh", "-c", "MANPAGER=cat MANWIDTH=80 man clusterctl"]);
        assert!(text.contains("gen-units"), "man clusterctl:\n{text}");
    } else {
        eprintln!("package: man-db not installed in the instance: checked the page files only");
    }
}

/// Completions: bash completes the subcommands from the packaged file (loaded the way
/// bash-completion loads it when that is installed); zsh and fish files are where those
/// shells look, and are checked by the shells themselves when installed.
fn check_completions(sd: &Systemd) {
    let bash_file = "/usr/share/bash-completion/completions/clusterctl";
    let load = if exists_inside(sd, "/usr/share/bash-completion/bash_completion") {
        // bash-completion's own on-demand loader finds the file by the command's name.
        ". /usr/share/bash-completion/bash_completion && __load_completion clusterctl"
    } else {
        eprintln!("package: bash-completion not installed: sourcing {bash_file} directly");
        ". /usr/share/bash-completion/completions/clusterctl"
    };
    let script = format!(
        "{load} && complete -p clusterctl && COMP_WORDS=(clusterctl ''); COMP_CWORD=1; \
         COMP_LINE='clusterctl '; COMP_POINT=11; \"$(complete -p clusterctl | \
         sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')\" clusterctl '' clusterctl; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let words = sd.run_ok(&["bash", "-c", &script]);
    for sub in ["run", "gen-units", "reload", "status", "man", "completions"] {
        assert!(
            words.lines().any(|w| w == sub),
            "bash does not complete `clusterctl {sub}`:\n{words}"
        );
    }

    let zsh_file = "/usr/share/zsh/vendor-completions/_clusterctl";
    let zsh = sd.run_ok(&["head", "-n", "1", zsh_file]);
    assert_eq!(zsh.trim_end(), "#compdef clusterctl", "{zsh_file}");
    if exists_inside(sd, "/usr/bin/zsh") {
        let func = sd.run_ok(&[
            "zsh",
            "-c",
            "autoload -Uz compinit && compinit -u -D && print -r -- $_comps[clusterctl]",
        ]);
        assert_eq!(func.trim_end(), "_clusterctl", "zsh's compinit finds it");
    }

    let fish_file = "/usr/share/fish/vendor_completions.d/clusterctl.fish";
    let fish = sd.run_ok(&["cat", fish_file]);
    assert!(fish.contains("complete -c clusterctl"), "{fish_file}");
    if exists_inside(sd, "/usr/bin/fish") {
        let words = sd.run_ok(&["fish", "-c", "complete -C 'clusterctl '"]);
        assert!(words.contains("gen-units"), "fish completes:\n{words}");
    }
}

/// The README's "Under systemd" steps with the packaged binary and gen-units' default
/// `--clusterctl`: the unit runs /usr/bin/clusterctl, several workers answer, and
/// `systemctl reload` replaces them.
fn check_under_systemd(sd: &Systemd) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // The example worker (examples/worker/): it answers `worker=… pid=… generation=…`.
    let worker = Systemd::path(&example("worker"));
    sd.run_ok(&[
        "clusterctl",
        "gen-units",
        APP,
        "-o",
        "/etc/systemd/system",
        "--listen",
        &listen,
        "--workers",
        "3",
        "--",
        &worker,
    ]);
    let service = sd.run_ok(&["cat", &format!("/etc/systemd/system/{APP}.service")]);
    let exec_start = service
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap_or_default();
    assert!(
        exec_start.starts_with("ExecStart=/usr/bin/clusterctl run "),
        "the unit does not run the packaged binary: {exec_start}"
    );
    sd.systemctl_ok(&["daemon-reload"]);
    sd.systemctl_ok(&["enable", "--now", &format!("{APP}.socket")]);

    let body = wait_for("the first answer", SECS(30), || http_get(port, "/").ok());
    assert!(body.contains("generation=1"), "{body}");
    sd.wait_for(&format!("{APP} to be active"), SECS(30), || {
        sd.unit_property(&format!("{APP}.service"), "ActiveState") == "active"
    });
    let first = answering(port, 3);
    assert_eq!(first.len(), 3, "three workers answer: {first:?}");
    assert!(
        first.iter().all(|w| w.ends_with(" generation=1")),
        "{first:?}"
    );
    let main_pid = sd.unit_property(&format!("{APP}.service"), "MainPID");
    let status = sd.run_ok(&["clusterctl", "status", "--json", APP]);
    assert!(status.contains("\"generation\":1,"), "{status}");

    sd.systemctl_ok(&["reload", APP]);
    // `systemctl reload` returns once generation 2 serves; generation 1 then drains.
    wait_for("generation 1 to finish draining", SECS(30), || {
        let status = sd.run_ok(&["clusterctl", "status", "--json", APP]);
        (status.contains("\"generation\":2,") && !status.contains("\"draining\"")).then_some(())
    });
    let second = answering(port, 3);
    assert_eq!(second.len(), 3, "three workers answer: {second:?}");
    assert!(
        second.iter().all(|w| w.ends_with(" generation=2")),
        "only the new generation answers after the reload: {second:?}"
    );
    let pids = |set: &std::collections::HashSet<String>| -> Vec<String> {
        set.iter()
            .filter_map(|w| w.split(' ').next().map(str::to_owned))
            .collect()
    };
    let (old_pids, new_pids) = (pids(&first), pids(&second));
    assert!(
        old_pids.iter().all(|p| !new_pids.contains(p)),
        "the reload replaced every worker: {first:?} then {second:?}"
    );
    assert_eq!(
        sd.unit_property(&format!("{APP}.service"), "MainPID"),
        main_pid,
        "the supervisor's pid survives the reload"
    );

    sd.systemctl_ok(&[
        "disable",
        "--now",
        &format!("{APP}.socket"),
        &format!("{APP}.service"),
    ]);
}

/// Prints how long each step took (the figures the report gives).
struct Phases(Instant);

impl Phases {
    fn start() -> Phases {
        Phases(Instant::now())
    }

    fn done(&mut self, what: &str) {
        eprintln!("package: {what}: {} ms", self.0.elapsed().as_millis());
        self.0 = Instant::now();
    }
}

/// The whole life of the package in one instance: install, use, remove.
fn install_use_remove(sd: &Systemd, deb: &Path) {
    let deb_inside = Systemd::path(deb);
    let (files, dirs) = package_contents(sd, &deb_inside);
    for expected in [
        "/usr/bin/clusterctl",
        "/usr/share/man/man1/clusterctl.1.gz",
        "/usr/share/bash-completion/completions/clusterctl",
        "/usr/share/zsh/vendor-completions/_clusterctl",
        "/usr/share/fish/vendor_completions.d/clusterctl.fish",
        "/usr/share/doc/clusterctl/copyright",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} is not in the package: {files:?}"
        );
    }
    // The directories only the package brings (e.g. fish's, when fish is not installed)
    // must go with it.
    let new_dirs: Vec<&String> = dirs.iter().filter(|d| !exists_inside(sd, d)).collect();
    assert!(
        new_dirs.iter().any(|d| *d == "/usr/share/doc/clusterctl"),
        "/usr/share/doc/clusterctl existed before the install: {dirs:?}"
    );

    let mut phase = Phases::start();
    sd.run_ok(&["dpkg", "-i", &deb_inside]);
    phase.done("dpkg -i");
    let missing: Vec<&String> = files
        .iter()
        .chain(&dirs)
        .filter(|f| !exists_inside(sd, f))
        .collect();
    assert!(missing.is_empty(), "dpkg -i did not install {missing:?}");
    let version = sd.run_ok(&["clusterctl", "--version"]);
    assert_eq!(
        version.trim_end(),
        format!("clusterctl {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        sd.run_ok(&["/bin/sh", "-c", "command -v clusterctl"])
            .trim_end(),
        "/usr/bin/clusterctl"
    );
    let copyright = sd.run_ok(&["cat", "/usr/share/doc/clusterctl/copyright"]);
    assert!(
        copyright.contains("License: MIT or Apache-2.0"),
        "{copyright}"
    );

    check_man_pages(sd, &files);
    check_completions(sd);
    phase.done("man pages and completions");
    check_under_systemd(sd);
    phase.done("README steps under systemd");

    sd.run_ok(&["apt-get", "remove", "-y", "clusterctl"]);
    phase.done("apt-get remove");
    let left: Vec<&String> = files
        .iter()
        .chain(new_dirs)
        .filter(|f| exists_inside(sd, f))
        .collect();
    assert!(left.is_empty(), "apt-get remove left {left:?}");
    // No conffiles, so nothing is kept for a purge: dpkg forgets the package entirely.
    let status = sd.run(&["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "clusterctl"]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.is_empty() || status.starts_with("un"),
        "dpkg still knows clusterctl after removal: {status:?}"
    );
    assert!(
        !sd.run(&["/bin/sh", "-c", "command -v clusterctl"])
            .status
            .success(),
        "clusterctl is still on PATH"
    );
}

fn deb_lifecycle(version: Version) {
    let Some(sd) = Systemd::boot_version(version) else {
        return;
    };
    let deb = build_deb();
    let started = Instant::now();
    install_use_remove(&sd, &deb);
    eprintln!(
        "package: install, use and remove took {} ms",
        started.elapsed().as_millis()
    );
}

#[test]
fn deb_installs_serves_reloads_and_removes_cleanly_252() {
    deb_lifecycle(Version::V252);
}

#[test]
fn deb_installs_serves_reloads_and_removes_cleanly_257() {
    deb_lifecycle(Version::V257);
}
