//! A throw-away, real systemd running as PID 1 in private namespaces, so integration
//! tests can install units, start/stop/reload them and read the journal exactly as
//! clusterctl will in production, without a VM and without touching the host's service
//! manager. Two versions ([`Version`]): the host's own systemd 252
//! (`/lib/systemd/systemd`, [`Systemd::boot`]) and Debian 13's 257 from a cached rootfs
//! ([`Systemd::boot_version`]; see "systemd 257" below). Both have the same API.
//!
//! # How an instance is built
//!
//! [`Systemd::boot`] writes a shell script into a fresh host temp dir and runs
//! `setpriv --pdeathsig KILL -- unshare --fork --pid --mount --ipc --uts
//! --propagation private --kill-child /bin/sh boot.sh …`. The script (PID 1 of
//! the new namespaces) joins the instance's cgroup (see below), mounts a tmpfs,
//! builds an overlayfs with the host's `/` as read-only lower layer, mounts
//! `proc`, rbinds `/sys` and `/dev`, puts private tmpfs on `/run`, `/tmp` and
//! `/dev/shm`, trims the unit set (below), `pivot_root`s into the overlay (not
//! `chroot`: a chrooted process may not create user namespaces, so units with
//! `PrivateUsers=` would fail with 217/USER) and execs systemd with
//! `container=unshare`. Tests talk to it with `nsenter -t PID1 -m -p -i -u -r -w
//! …`; everything written inside lands in the overlay's tmpfs and disappears
//! with the instance. The network namespace is shared on purpose: a socket unit
//! on `127.0.0.1:PORT` is reachable from the test.
//!
//! The unit set is trimmed so that the instance does not start unrelated host
//! services or touch global host state: all `*.wants/*` links under
//! `/etc/systemd/system` except dbus/journald ones are deleted (no postgres,
//! timers, getty…), and a few units from `/usr/lib` are masked: the console
//! getty (would fight over the VM console), systemd-sysctl (would rewrite host
//! sysctls: the network namespace is shared), systemd-binfmt and
//! modules-load (kernel-global), tmpfiles-setup-dev/kmod-static-nodes (write to
//! the host's `/dev`), logind and the journald audit socket. journald does not
//! read the host's kernel log (`ReadKMsg=no`) and writes only warnings about
//! itself there.
//!
//! # Cgroups, and why instances may run in parallel without a lock
//!
//! The host uses the cgroup v1 "hybrid" layout and the test process sits in the
//! root of `name=systemd` and of the unified hierarchy. Measured: a systemd
//! booted there takes over the *host's* root cgroups (`/init.scope`,
//! `/system.slice/…` in name=systemd, unified, memory, pids and devices) and
//! leaves them behind after exiting, so two such instances would share e.g.
//! `/system.slice/x.service` and stopping a unit in one would kill the other
//! one's processes. Therefore every instance gets its own cgroup,
//! `clusterctl-harness/<test pid>-<n>`, created by the harness in each
//! hierarchy systemd uses for process tracking (name=systemd and/or cgroup2),
//! and the boot script moves itself there before exec'ing systemd. systemd
//! takes the cgroup it starts in as its root, so each instance only ever works
//! below its own directory (verified: `ControlGroup=/clusterctl-harness/<id>/
//! system.slice/…`; two instances running the same unit do not interfere, see
//! `systemd_smoke::parallel_instances_are_isolated`). Because the per-instance
//! path does not exist in the legacy controller hierarchies (memory, pids,
//! cpu, devices…), systemd treats those controllers as unavailable: processes
//! stay in the test process's memory cgroup, and resource accounting/limits
//! (`MemoryMax=`, `TasksMax=`, `MemoryCurrent`…) are **not** enforced or
//! reported inside the harness (`MemoryMax=` is accepted and shown, the
//! `…Current` properties are `[not set]`). Everything else is per namespace
//! (mount, pid, ipc, uts, private `/run`, `/tmp`, `/dev/shm`), so there is no
//! shared state left to serialize and no lock file is used; what instances
//! share with each other and the host is the kernel, the network namespace
//! (use [`super::free_port`]), `/sys` and `/dev` (rbind mounts systemd needs;
//! nothing started inside writes to them, see the masked units above) and
//! read-only (overlay) views of the host's files. Teardown
//! removes the instance's cgroup directories; those of a test process that
//! was SIGKILLed are swept by the next boot (owner pid no longer alive). The
//! empty parent `clusterctl-harness` cgroup is left in place on purpose
//! (removing it would race with a concurrent boot).
//!
//! # systemd 257
//!
//! Same recipe (verified in `../shared/systemd-257/`), with three differences: the
//! overlay's lower layer is a Debian 13 rootfs built by `scripts/sd257-rootfs.sh build`
//! (mmdebstrap, cached under `/var/cache/clusterctl-tests/sd257-<hash of recipe and
//! packages>`, built by `scripts/test.sh` before the tests; a missing rootfs is a SKIP,
//! or a failure in CI), so nothing of the host is visible inside except the checkout and
//! the build output under [`Systemd::path`]; the launcher joins the instance's cgroup in
//! the host's cgroup2 hierarchy before `unshare --cgroup`, and the boot script replaces
//! `/sys/fs/cgroup` by a cgroup2 mount of that namespace, so 257 sees a pure unified
//! hierarchy rooted at its own directory (instances stay isolated and may run in
//! parallel; no controller is available inside, as for 252); and the instance gets its
//! own machine id. The host's binaries (glibc 2.36) run on trixie's glibc 2.41.
//!
//! # Lifetime
//!
//! `Drop` (which also runs when the test panics) sends SIGRTMIN+4 to PID 1
//! (systemd powers off, i.e. exits, in a container), waits for `unshare` under
//! a deadline, SIGKILLs PID 1 and `unshare` as a fallback, then removes the
//! cgroups and the temp dir. If the test *process* dies, `setpriv --pdeathsig`
//! kills `unshare`, whose `--kill-child` kills PID 1 and with it the whole pid
//! namespace; the mounts only ever existed in the private mount namespace.
//! PDEATHSIG fires when the *thread* that booted the instance exits, so boot
//! and use an instance on the test's own thread (the normal case).
//!
//! Caveats: the host's `/` is the overlay's lower layer and must not be
//! modified while an instance runs if the instance is expected to see the
//! change (overlayfs semantics are undefined then; create files before
//! booting, or use [`Systemd::write_file`]). Host `/tmp`, `/run` are not
//! visible inside. Resource controllers are unavailable (see above).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{self, Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, geteuid};

use super::{in_ci, output_with_deadline, poll_until};

/// How long booting (spawn to `running`/`degraded`) may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for any single command run inside an instance.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long systemd gets to power off cleanly before it is SIGKILLed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for killed processes and busy cgroups to go away.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Parent directory of all instance cgroups, in every hierarchy.
const CGROUP_PARENT: &str = "clusterctl-harness";
/// Prefix of the per-instance temp dirs (in `std::env::temp_dir()`).
const TEMP_PREFIX: &str = "clusterctl-harness-";
/// `PATH` for everything the harness runs (the test's own `PATH` may point at
/// shims that do not work inside).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The systemd binary booted as PID 1.
const SYSTEMD_BIN: &str = "/lib/systemd/systemd";
/// Host tools the harness needs.
const TOOLS: &[&str] = &["setpriv", "unshare", "nsenter", "kill"];

/// Runs as PID 1 of the new namespaces; `$1` is the instance's temp dir, the
/// remaining arguments are the `cgroup.procs` files of the instance's cgroups.
const BOOT_SCRIPT: &str = r#"#!/bin/sh
# Written by tests/support/systemd.rs: turns a fresh pid+mount namespace into a
# container whose root is an overlay over the host's / and execs systemd in it.
set -eu
dir=$1
shift
# systemd uses the cgroup it starts in as its root: give it its own.
for procs in "$@"; do echo 0 > "$procs"; done

base=$dir/base
mkdir -p "$base"
mount -t tmpfs -o mode=0755 harness "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
root=$base/root
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
# The checkout and its build output, read-only under /opt/clusterctl-harness (see
# Systemd::path): visible to services whatever PrivateTmp=/ProtectHome= hide, wherever
# the clone lives (/tmp, /root, another mount).
while IFS= read -r path; do
    [ -d "$path" ] || continue
    mkdir -p "$root/opt/clusterctl-harness$path"
    mount --rbind "$path" "$root/opt/clusterctl-harness$path"
    mount -o remount,bind,ro "$root/opt/clusterctl-harness$path"
done < "$dir/binds"

# Start only what tests need: no host services, nothing touching global state.
etc=$root/etc/systemd/system
for link in "$etc"/*.wants/*; do
    case "$link" in
        *dbus*|*journal*) ;;
        *) rm -f "$link" ;;
    esac
done
for unit in console-getty.service getty.target systemd-logind.service \
    systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
    proc-sys-fs-binfmt_misc.mount systemd-modules-load.service \
    systemd-tmpfiles-setup-dev.service kmod-static-nodes.service \
    systemd-journald-audit.socket; do
    ln -sf /dev/null "$etc/$unit"
done
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nReadKMsg=no\n' > "$root/etc/systemd/journald.conf.d/clusterctl-harness.conf"
# journald logs about itself to the (host's) kernel log: only warnings, please.
mkdir -p "$etc/systemd-journald.service.d"
printf '[Service]\nEnvironment=SYSTEMD_LOG_LEVEL=warning\n' > "$etc/systemd-journald.service.d/clusterctl-harness.conf"

cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=unshare /lib/systemd/systemd --system
"#;

/// Runs as PID 1 of the new namespaces for a systemd 257 instance; `$1` is the
/// instance's temp dir, `$2` the Debian 13 rootfs (the overlay's lower layer). The
/// launcher already joined the instance's cgroup2 directory and `unshare --cgroup` rooted
/// a cgroup namespace there. Same recipe as `../shared/systemd-257/sysd257.sh`.
const BOOT_SCRIPT_257: &str = r#"#!/bin/sh
# Written by tests/support/systemd.rs: turns a fresh pid+mount+cgroup namespace into a
# container whose root is an overlay over a Debian 13 rootfs and execs systemd 257 in it.
set -eu
dir=$1
rootfs=$2
base=$dir/base
mkdir -p "$base"
mount -t tmpfs -o mode=0755 harness "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$base/upper,workdir=$base/work" "$base/root"
root=$base/root
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
# The host's v1/hybrid cgroup mounts make way for a cgroup2 mount of our own cgroup
# namespace: systemd 257 sees a pure unified hierarchy rooted at the instance's cgroup.
umount -R "$root/sys/fs/cgroup" 2>/dev/null || umount -l "$root/sys/fs/cgroup" 2>/dev/null || true
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
while IFS= read -r path; do
    [ -d "$path" ] || continue
    mkdir -p "$root/opt/clusterctl-harness$path"
    mount --rbind "$path" "$root/opt/clusterctl-harness$path"
    mount -o remount,bind,ro "$root/opt/clusterctl-harness$path"
done < "$dir/binds"

etc=$root/etc/systemd/system
for link in "$etc"/*.wants/*; do
    case "$link" in
        *dbus*|*journal*) ;;
        *) rm -f "$link" ;;
    esac
done
for unit in console-getty.service getty.target systemd-logind.service \
    systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
    proc-sys-fs-binfmt_misc.mount systemd-modules-load.service kmod-static-nodes.service \
    systemd-tmpfiles-setup-dev.service systemd-tmpfiles-setup-dev-early.service \
    systemd-journald-audit.socket systemd-firstboot.service systemd-pstore.service; do
    ln -sf /dev/null "$etc/$unit"
done
mkdir -p "$root/etc/systemd/journald.conf.d" "$etc/systemd-journald.service.d"
printf '[Journal]\nReadKMsg=no\n' > "$root/etc/systemd/journald.conf.d/clusterctl-harness.conf"
printf '[Service]\nEnvironment=SYSTEMD_LOG_LEVEL=warning\n' > "$etc/systemd-journald.service.d/clusterctl-harness.conf"
# A machine id of its own: no first boot (ConditionFirstBoot=) and a stable journal.
tr -d - < /proc/sys/kernel/random/uuid > "$root/etc/machine-id"

cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true
exec env -i container=unshare /usr/lib/systemd/systemd --system --show-status=no
"#;

/// Which systemd an instance runs.
///
/// - [`Version::V252`]: the host's own (Debian 12), with the host's `/` as the overlay's
///   lower layer, so every host file (python3, gunicorn, node, …) is visible inside.
/// - [`Version::V257`]: Debian 13's, from the rootfs `scripts/sd257-rootfs.sh build`
///   makes (cached under `/var/cache/clusterctl-tests`; `scripts/test.sh` builds it before
///   the tests run, so tests never race to build it). Only that rootfs is visible inside,
///   plus the checkout and its build output under [`Systemd::path`]; the servers the tests
///   need are installed in it. Each instance gets its own cgroup2 directory and a cgroup
///   namespace rooted there, so systemd 257 sees a pure unified hierarchy on this hybrid
///   host. The host's binaries (glibc 2.36) run on trixie's glibc 2.41.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V252,
    V257,
}

impl Version {
    /// The major version number, as `systemctl --version` prints it.
    pub fn number(self) -> u32 {
        match self {
            Version::V252 => 252,
            Version::V257 => 257,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "systemd {}", self.number())
    }
}

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// One booted systemd instance; torn down on drop. See the module docs.
#[derive(Debug)]
pub struct Systemd {
    /// `unshare` (exec'ed by `setpriv`), parent of PID 1.
    unshare: Child,
    /// Host pid of the instance's PID 1 (0 while not known yet).
    pid1: u32,
    /// `<test pid>-<n>`: names the temp dir and the cgroups.
    id: String,
    /// Host temp dir holding the boot script, its log and the overlay mount point.
    dir: PathBuf,
    /// Set once diagnostics went into a panic message (no need to repeat them on drop).
    diagnosed: AtomicBool,
    /// Which systemd runs as PID 1.
    version: Version,
}

impl Systemd {
    /// Boots a fresh instance and waits until `systemctl is-system-running`
    /// reports `running` or `degraded`.
    ///
    /// When that is impossible (not root, tools missing, namespaces not
    /// allowed, boot failing) this prints a `SKIPPED` message and returns
    /// `None`, unless the environment variable `CI` is set (and not
    /// `false`/`0`): then it panics with the details.
    pub fn boot() -> Option<Systemd> {
        Self::boot_version(Version::V252)
    }

    /// Like [`Systemd::boot`], for the given systemd [`Version`]; the same API works on
    /// both. For 257 the rootfs must have been built (`bash scripts/sd257-rootfs.sh
    /// build`, which `scripts/test.sh` runs): when it is missing the test is skipped, or
    /// fails when `CI` is set.
    pub fn boot_version(version: Version) -> Option<Systemd> {
        let rootfs = match preflight(version) {
            Ok(rootfs) => rootfs,
            Err(reason) => return unavailable(version, &reason),
        };
        sweep_stale();
        let started = Instant::now();
        match Self::try_boot(version, rootfs.as_deref()) {
            Ok(systemd) => {
                eprintln!(
                    "systemd harness: {version} instance {} up in {} ms (PID 1 = host pid {})",
                    systemd.id,
                    started.elapsed().as_millis(),
                    systemd.pid1
                );
                Some(systemd)
            }
            Err(reason) => unavailable(version, &reason),
        }
    }

    /// Which systemd this instance runs.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Host pid of the instance's PID 1 (systemd).
    /// Where a file of the checkout or its build output (a host path) is seen inside the
    /// instance: under `/opt/clusterctl-harness`, so that hardened units (PrivateTmp=,
    /// ProtectHome=) can run it wherever the clone lives.
    pub fn path(host: &Path) -> String {
        format!("/opt/clusterctl-harness{}", host.display())
    }

    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// Runs `argv` inside the instance (all its namespaces, its root and
    /// working directory) with a clean environment (`PATH`, `LANG=C.UTF-8`),
    /// stdin from `/dev/null`. Panics only if the command cannot be run at all
    /// or exceeds the per-command timeout (60 s); a non-zero exit is returned.
    pub fn run(&self, argv: &[&str]) -> Output {
        self.run_with_input(argv, None)
    }

    /// Runs `argv` inside the instance; panics with its status and output unless it
    /// succeeds; returns its stdout.
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl --no-pager ARGS…` inside the instance.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.run(&prepend(&["systemctl", "--no-pager"], args))
    }

    /// Like [`Systemd::systemctl`], but panics unless it exits successfully;
    /// the panic message carries stdout, stderr, failed units and the journal tail.
    pub fn systemctl_ok(&self, args: &[&str]) {
        let output = self.systemctl(args);
        assert!(
            output.status.success(),
            "`systemctl {}` failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.diagnostics()
        );
    }

    /// `journalctl --no-pager ARGS…` inside the instance; returns stdout and
    /// panics if journalctl fails. Log lines reach the journal asynchronously:
    /// poll with [`Systemd::wait_for`] when looking for a fresh line.
    pub fn journal(&self, args: &[&str]) -> String {
        let output = self.run(&prepend(&["journalctl", "--no-pager"], args));
        assert!(
            output.status.success(),
            "`journalctl {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Writes `contents` to the absolute `path` inside the instance (into the
    /// overlay, so the host is untouched), creating parent directories; files
    /// get mode 0644, directories 0755.
    pub fn write_file(&self, path: &str, contents: &[u8]) {
        assert!(
            path.starts_with('/'),
            "write_file needs an absolute path, got {path:?}"
        );
        let output = self.run_with_input(
            &[
                "/bin/sh",
                "-c",
                r#"umask 022 && mkdir -p -- "$(dirname -- "$1")" && cat > "$1""#,
                "sh",
                path,
            ],
            Some(contents),
        );
        assert!(
            output.status.success(),
            "writing {path} inside the instance failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Polls `condition` until it holds; panics naming `what` (with failed
    /// units and the journal tail) when `timeout` passes first.
    pub fn wait_for(&self, what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
        assert!(
            poll_until(Instant::now() + timeout, condition),
            "timed out after {timeout:?} waiting for: {what}\n{}",
            self.diagnostics()
        );
    }

    /// `systemctl show -P PROP UNIT`, without the trailing newline; panics on failure.
    pub fn unit_property(&self, unit: &str, prop: &str) -> String {
        let output = self.systemctl(&["show", "-P", prop, unit]);
        assert!(
            output.status.success(),
            "`systemctl show -P {prop} {unit}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let mut value = String::from_utf8_lossy(&output.stdout).into_owned();
        if value.ends_with('\n') {
            value.pop();
        }
        value
    }

    fn run_with_input(&self, argv: &[&str], input: Option<&[u8]>) -> Output {
        assert!(!argv.is_empty(), "run needs a command");
        output_with_deadline(&mut nsenter(self.pid1, argv), input, COMMAND_TIMEOUT).unwrap_or_else(
            |err| {
                panic!(
                    "running `{}` inside systemd instance {}: {err}",
                    argv.join(" "),
                    self.id
                )
            },
        )
    }

    /// Failed units and the last journal lines, for panic messages. Never panics.
    fn diagnostics(&self) -> String {
        self.diagnosed.store(true, Ordering::Relaxed);
        let mut text = String::new();
        for (title, argv) in [
            (
                "failed units",
                &["systemctl", "--no-pager", "--failed", "--no-legend"][..],
            ),
            (
                "journal tail",
                &[
                    "journalctl",
                    "--no-pager",
                    "-n",
                    "80",
                    "-o",
                    "short-monotonic",
                ][..],
            ),
        ] {
            let body = match output_with_deadline(
                &mut nsenter(self.pid1, argv),
                None,
                Duration::from_secs(10),
            ) {
                Ok(output) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
                Err(err) => format!("(unavailable: {err})\n"),
            };
            let _ = write!(
                text,
                "--- {title} (systemd instance {}) ---\n{body}",
                self.id
            );
        }
        text
    }

    fn try_boot(version: Version, rootfs: Option<&Path>) -> Result<Systemd, String> {
        let id = format!(
            "{}-{}",
            process::id(),
            NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("{TEMP_PREFIX}{id}"));
        // Anything already named like this is from a dead process that had our pid.
        remove_host_state(&id, &dir);
        let procs = match prepare_host_state(version, &id, &dir) {
            Ok(procs) => procs,
            Err(err) => {
                remove_host_state(&id, &dir);
                return Err(format!("preparing {}: {err}", dir.display()));
            }
        };
        let log = dir.join("boot.log");
        let spawned = File::create(&log).and_then(|out| {
            let err = out.try_clone()?;
            let mut cmd = Command::new("setpriv");
            cmd.args(["--pdeathsig", "KILL", "--"]);
            match rootfs {
                None => {
                    cmd.arg("unshare")
                        .args(["--fork", "--pid", "--mount", "--ipc", "--uts"])
                        .args(["--propagation", "private", "--kill-child", "/bin/sh"])
                        .arg(dir.join("boot.sh"))
                        .arg(&dir)
                        .args(procs);
                }
                Some(rootfs) => {
                    // A cgroup namespace is rooted at its creator's cgroup: join the
                    // instance's cgroup2 directory first, then exec unshare (the same
                    // process, so PDEATHSIG and the pid the harness watches stay valid).
                    cmd.args([
                        "/bin/sh",
                        "-c",
                        r#"echo $$ > "$1" && shift && exec "$@""#,
                        "sh",
                    ])
                    .args(procs)
                    .arg("unshare")
                    .args(["--fork", "--pid", "--mount", "--ipc", "--uts", "--cgroup"])
                    .args(["--propagation", "private", "--kill-child", "/bin/sh"])
                    .arg(dir.join("boot.sh"))
                    .arg(&dir)
                    .arg(rootfs);
                }
            }
            cmd.env_clear()
                .env("PATH", PATH)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
        });
        let unshare = match spawned {
            Ok(child) => child,
            Err(err) => {
                remove_host_state(&id, &dir);
                return Err(format!("spawning setpriv/unshare: {err}"));
            }
        };
        // From here on, dropping `systemd` tears everything down.
        let mut systemd = Systemd {
            unshare,
            pid1: 0,
            id,
            dir,
            diagnosed: AtomicBool::new(false),
            version,
        };
        let deadline = Instant::now() + BOOT_TIMEOUT;
        if let Err(reason) = systemd
            .wait_for_pid1(deadline)
            .and_then(|()| systemd.wait_until_up(deadline))
        {
            let boot_log = fs::read_to_string(&log).unwrap_or_default();
            let journal = if systemd.pid1 == 0 {
                String::new()
            } else {
                systemd.diagnostics()
            };
            return Err(format!(
                "{reason}\n--- boot log ({}) ---\n{boot_log}\n{journal}",
                log.display()
            ));
        }
        Ok(systemd)
    }

    /// Finds the child of `unshare` and waits until it has exec'ed systemd.
    fn wait_for_pid1(&mut self, deadline: Instant) -> Result<(), String> {
        let unshare_pid = self.unshare.id();
        let mut exited = None;
        let found = poll_until(deadline, || {
            if let Ok(Some(status)) = self.unshare.try_wait() {
                exited = Some(status);
                return true;
            }
            if self.pid1 == 0 {
                self.pid1 = children(unshare_pid).first().copied().unwrap_or(0);
            }
            self.pid1 != 0
                && fs::read_to_string(format!("/proc/{}/comm", self.pid1))
                    .is_ok_and(|comm| comm.trim_end() == "systemd")
        });
        if let Some(status) = exited {
            self.pid1 = 0;
            return Err(format!("unshare exited early ({status})"));
        }
        if found {
            Ok(())
        } else {
            Err(format!(
                "PID 1 (host pid {}) did not exec systemd within {BOOT_TIMEOUT:?}",
                self.pid1
            ))
        }
    }

    /// Polls `systemctl is-system-running` until `running` or `degraded`.
    fn wait_until_up(&mut self, deadline: Instant) -> Result<(), String> {
        let mut state = String::new();
        let mut exited = None;
        let up = poll_until(deadline, || {
            if let Ok(Some(status)) = self.unshare.try_wait() {
                exited = Some(status);
                return true;
            }
            state = match output_with_deadline(
                &mut nsenter(self.pid1, &["systemctl", "is-system-running"]),
                None,
                Duration::from_secs(10),
            ) {
                Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
                Err(err) => err.to_string(),
            };
            state == "running" || state == "degraded"
        });
        if let Some(status) = exited {
            return Err(format!("unshare exited during boot ({status})"));
        }
        if !up {
            return Err(format!(
                "systemd did not reach running/degraded within {BOOT_TIMEOUT:?} (last state: {state})"
            ));
        }
        if state == "degraded" {
            let failed = self.systemctl(&["--failed", "--no-legend"]);
            eprintln!(
                "systemd harness: instance {} is degraded; failed units:\n{}",
                self.id,
                String::from_utf8_lossy(&failed.stdout)
            );
        }
        Ok(())
    }

    /// True if `pid1` is still the child of our `unshare` (guards against
    /// signalling a recycled pid).
    fn pid1_is_ours(&self) -> bool {
        self.pid1 != 0 && children(self.unshare.id()).contains(&self.pid1)
    }

    fn shut_down(&mut self) {
        if matches!(self.unshare.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.pid1_is_ours() {
            // nix's `Signal` cannot name real-time signals, hence kill(1).
            let signalled = output_with_deadline(
                Command::new("kill")
                    .args(["-s", "RTMIN+4", &self.pid1.to_string()])
                    .env_clear()
                    .env("PATH", PATH),
                None,
                Duration::from_secs(10),
            )
            .is_ok_and(|output| output.status.success());
            if signalled && wait_exit(&mut self.unshare, SHUTDOWN_TIMEOUT) {
                return;
            }
            eprintln!(
                "systemd harness: instance {} did not power off within {SHUTDOWN_TIMEOUT:?}; killing it",
                self.id
            );
        }
        if self.pid1_is_ours() {
            // SIGKILL to a pid namespace's init kills the whole namespace;
            // unshare then reaps it and exits.
            let pid = Pid::from_raw(i32::try_from(self.pid1).expect("pid fits in i32"));
            let _ = kill(pid, Signal::SIGKILL);
            if wait_exit(&mut self.unshare, KILL_TIMEOUT) {
                return;
            }
        }
        // `--kill-child` makes unshare's death kill PID 1 in any case.
        let _ = self.unshare.kill();
        if !wait_exit(&mut self.unshare, KILL_TIMEOUT) {
            eprintln!(
                "systemd harness: unshare (pid {}) of instance {} could not be reaped",
                self.unshare.id(),
                self.id
            );
        }
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        if thread::panicking() && !self.diagnosed.load(Ordering::Relaxed) && self.pid1_is_ours() {
            eprintln!("{}", self.diagnostics());
        }
        let started = Instant::now();
        self.shut_down();
        remove_host_state(&self.id, &self.dir);
        eprintln!(
            "systemd harness: instance {} torn down in {} ms",
            self.id,
            started.elapsed().as_millis()
        );
    }
}

/// `nsenter` into all namespaces, the root and the cwd of `pid1`, running
/// `argv` with a clean environment.
fn nsenter(pid1: u32, argv: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("--target")
        .arg(pid1.to_string())
        .args(["-m", "-p", "-i", "-u", "-r", "-w", "--"])
        .args(argv)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8");
    cmd
}

fn prepend<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().collect()
}

fn unavailable(version: Version, reason: &str) -> Option<Systemd> {
    assert!(
        !in_ci(),
        "\n\n==== systemd test harness: cannot boot {version}, and CI is set ====\n{reason}\n\
         ==== (outside CI these tests are skipped) ====\n"
    );
    // Straight to fd 2: libtest's capture (print macros only) would hide it.
    let _ = writeln!(
        io::stderr(),
        "SKIPPED: cannot boot a {version} test instance: {reason}\n\
         (set CI=true to turn this into a failure)"
    );
    None
}

/// Cheap checks that tell "this machine cannot do it" apart from a broken boot; returns
/// the rootfs to boot (`None`: the host's `/`).
fn preflight(version: Version) -> Result<Option<PathBuf>, String> {
    if !geteuid().is_root() {
        return Err("not running as root".to_owned());
    }
    for tool in TOOLS {
        if !std::env::split_paths(PATH).any(|dir| dir.join(tool).is_file()) {
            return Err(format!("`{tool}` not found in {PATH}"));
        }
    }
    let rootfs = match version {
        Version::V252 => {
            if !Path::new(SYSTEMD_BIN).is_file() {
                return Err(format!("{SYSTEMD_BIN} not found"));
            }
            if systemd_cgroup_mounts().is_empty() {
                return Err("neither a name=systemd nor a cgroup2 hierarchy is mounted".to_owned());
            }
            None
        }
        Version::V257 => {
            if cgroup2_mount().is_none() {
                return Err("no cgroup2 hierarchy is mounted (systemd 257 needs one)".to_owned());
            }
            Some(rootfs_257()?)
        }
    };
    Ok(rootfs)
}

/// The Debian 13 rootfs for systemd 257: `$CLUSTERCTL_SD257_ROOTFS`, else where
/// `scripts/sd257-rootfs.sh path` says the current recipe's build lives. Errors name the
/// command that builds it.
pub fn rootfs_257() -> Result<PathBuf, String> {
    let rootfs = if let Some(path) = std::env::var_os("CLUSTERCTL_SD257_ROOTFS") {
        PathBuf::from(path)
    } else {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sd257-rootfs.sh");
        let output = output_with_deadline(
            Command::new("bash").arg(&script).arg("path"),
            None,
            COMMAND_TIMEOUT,
        )
        .map_err(|err| format!("running {}: {err}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} path failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    };
    if rootfs.join("usr/lib/systemd/systemd").is_file() {
        Ok(rootfs)
    } else {
        Err(format!(
            "no systemd 257 rootfs at {} (build it with `bash scripts/sd257-rootfs.sh build`, \
             which scripts/test.sh runs)",
            rootfs.display()
        ))
    }
}

/// Mount point of the cgroup2 (unified) hierarchy, if one is mounted.
fn cgroup2_mount() -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(fstype, _, _)| fstype == "cgroup2")
        .map(|(_, mount_point, _)| mount_point)
}

/// Creates the temp dir with the boot script and the instance's cgroups;
/// returns the `cgroup.procs` files the script must join.
fn prepare_host_state(version: Version, id: &str, dir: &Path) -> io::Result<Vec<OsString>> {
    fs::create_dir(dir)?;
    let script = match version {
        Version::V252 => BOOT_SCRIPT,
        Version::V257 => BOOT_SCRIPT_257,
    };
    fs::write(dir.join("boot.sh"), script)?;
    // Paths the instance must see as on the host: the checkout and the build output
    // (tests run its binaries and scripts inside).
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_clusterctl"))
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    let binds = format!("{}\n{}\n", env!("CARGO_MANIFEST_DIR"), bin_dir.display());
    fs::write(dir.join("binds"), binds)?;
    let mut procs = Vec::new();
    // systemd 257 gets a cgroup namespace rooted in the unified hierarchy only.
    let mounts = match version {
        Version::V252 => systemd_cgroup_mounts(),
        Version::V257 => cgroup2_mount().into_iter().collect(),
    };
    for mount in mounts {
        let cgroup = mount.join(CGROUP_PARENT).join(id);
        fs::create_dir_all(&cgroup)?;
        procs.push(cgroup.join("cgroup.procs").into_os_string());
    }
    Ok(procs)
}

/// Removes the instance's cgroups (in every hierarchy, retrying while they are
/// still busy with exiting processes) and its temp dir. Never panics.
fn remove_host_state(id: &str, dir: &Path) {
    for mount in cgroup_mounts() {
        let cgroup = mount.join(CGROUP_PARENT).join(id);
        let mut last = None;
        let removed = poll_until(Instant::now() + KILL_TIMEOUT, || {
            match remove_cgroup_tree(&cgroup) {
                Ok(()) => true,
                Err(err) if err.kind() == io::ErrorKind::NotFound => true,
                Err(err) => {
                    last = Some(err);
                    false
                }
            }
        });
        if !removed {
            eprintln!(
                "systemd harness: could not remove cgroup {}: {last:?}",
                cgroup.display()
            );
        }
    }
    if let Err(err) = fs::remove_dir_all(dir)
        && err.kind() != io::ErrorKind::NotFound
    {
        eprintln!("systemd harness: could not remove {}: {err}", dir.display());
    }
}

/// Removes what instances of test processes that no longer exist left behind
/// (they were SIGKILLed before their `Drop` could run).
fn sweep_stale() {
    let owner_is_dead = |name: &str| {
        name.split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| pid != process::id() && !Path::new(&format!("/proc/{pid}")).exists())
    };
    for mount in cgroup_mounts() {
        for name in dir_names(&mount.join(CGROUP_PARENT)) {
            if owner_is_dead(&name) {
                let _ = remove_cgroup_tree(&mount.join(CGROUP_PARENT).join(name));
            }
        }
    }
    let temp = std::env::temp_dir();
    for name in dir_names(&temp) {
        if let Some(id) = name.strip_prefix(TEMP_PREFIX)
            && owner_is_dead(id)
        {
            let _ = fs::remove_dir_all(temp.join(&name));
        }
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// rmdir, depth first: cgroup directories hold only kernel files, which go
/// away with the directory itself (unlinking them would fail).
fn remove_cgroup_tree(path: &Path) -> io::Result<()> {
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path)
}

/// Mount points of all cgroup hierarchies (v1 and v2) in our mount namespace.
fn cgroup_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(fstype, _, _)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(_, mount_point, _)| mount_point)
        .collect()
}

/// The hierarchies systemd tracks processes in: the legacy `name=systemd` one
/// and the unified (cgroup2) one, whichever exist.
fn systemd_cgroup_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(fstype, _, options)| {
            fstype == "cgroup2"
                || (fstype == "cgroup" && options.split(',').any(|o| o == "name=systemd"))
        })
        .map(|(_, mount_point, _)| mount_point)
        .collect()
}

/// (fs type, mount point, super options) of every entry of /proc/self/mountinfo.
fn mounts() -> Vec<(String, PathBuf, String)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let mount_point = head.split(' ').nth(4)?;
            let mut tail = tail.split(' ');
            let fstype = tail.next()?;
            let options = tail.nth(1).unwrap_or_default();
            Some((
                fstype.to_owned(),
                PathBuf::from(mount_point),
                options.to_owned(),
            ))
        })
        .collect()
}

/// Children of `pid` (all its threads), per /proc.
fn children(pid: u32) -> Vec<u32> {
    dir_names(Path::new(&format!("/proc/{pid}/task")))
        .into_iter()
        .filter_map(|tid| fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Waits (polling) for `child` to exit; true if it did before `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    poll_until(Instant::now() + timeout, || {
        matches!(child.try_wait(), Ok(Some(_)) | Err(_))
    })
}
