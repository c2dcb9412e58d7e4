//! The one PATH resolver: how a worker command's program (`python3`, `./server`,
//! `/usr/bin/node`) becomes the path that is executed. `run` resolves it for this machine;
//! `gen-units` for the machine the units are for, where an absolute path may not exist
//! here. Same rules otherwise, so a command that `gen-units` accepts starts under `run`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The search path when `PATH` is unset (what `execvp(3)` and systemd use, less `/sbin`).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Where the program will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsOn {
    /// This machine (`clusterctl run`): every path is checked now.
    ThisMachine,
    /// The machine the units are for (`gen-units`): an absolute path is taken as given,
    /// since it may exist only there; relative ones are still resolved (and checked) here.
    Target,
}

/// Resolves a worker program:
/// - an absolute path is checked to be an executable file (on `RunsOn::ThisMachine`);
/// - a path with a `/` (`./server`, `bin/app`) is taken relative to the current
///   directory, checked, and made absolute (symlinks resolved);
/// - a bare name is looked up in `path_var` (or `DEFAULT_PATH` when unset), skipping
///   relative entries, which would depend on the current directory.
///
/// The error says what was wrong and what to give instead (a configuration error).
pub fn resolve_program(
    program: &OsStr,
    path_var: Option<&OsStr>,
    runs_on: RunsOn,
) -> Result<PathBuf, String> {
    let shown = Path::new(program).display().to_string();
    if program.is_empty() {
        return Err("the worker command is empty: give the program after --".into());
    }
    let p = Path::new(program);
    if p.is_absolute() && runs_on == RunsOn::Target {
        return Ok(p.to_path_buf());
    }
    if program.as_bytes().contains(&b'/') {
        executable(p).map_err(|e| format!("cannot execute worker command {shown:?}: {e}"))?;
        if p.is_absolute() {
            return Ok(p.to_path_buf());
        }
        return std::fs::canonicalize(p)
            .map_err(|e| format!("cannot resolve worker command {shown:?}: {e}"));
    }
    let path = path_var.unwrap_or(OsStr::new(DEFAULT_PATH));
    for dir in std::env::split_paths(path).filter(|d| d.is_absolute()) {
        let candidate = dir.join(program);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "worker command {shown:?} not found in PATH ({}): No such file or directory; give its \
         absolute path{}",
        path.to_string_lossy(),
        match runs_on {
            RunsOn::ThisMachine => "",
            RunsOn::Target =>
                " (systemd would search its own fixed path when the service starts, which may \
                 find another program or none)",
        }
    ))
}

/// Whether `path` is a file this process could execute, or why not.
fn executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_dir() {
        return Err("is a directory".into());
    }
    // access(X_OK) succeeds for root whenever any execute bit is set, and for a file with
    // none, execve fails even for root.
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(std::io::Error::from_raw_os_error(nix::libc::EACCES).to_string());
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| std::io::Error::from(e).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn here(p: &str, path: Option<&str>) -> Result<PathBuf, String> {
        resolve_program(OsStr::new(p), path.map(OsStr::new), RunsOn::ThisMachine)
    }

    #[test]
    fn bare_names_are_looked_up_in_path() {
        let path = "relative/dir:/nonexistent:/bin:/usr/bin";
        let sh = here("sh", Some(path)).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        // PATH unset: the default path.
        assert!(here("sh", None).unwrap().is_absolute());
        let e = here("no-such-program-xyz", Some(path)).unwrap_err();
        assert!(e.contains("not found in PATH") && e.contains(path), "{e}");
        assert!(e.contains("give its absolute path"), "{e}");
        let e = resolve_program(
            OsStr::new("no-such-program-xyz"),
            Some(OsStr::new(path)),
            RunsOn::Target,
        )
        .unwrap_err();
        assert!(e.contains("systemd would search"), "{e}");
        // A relative PATH entry is never searched.
        assert!(here("sh", Some(".:relative")).is_err());
    }

    #[test]
    fn paths_are_checked_here_and_taken_as_given_for_the_target() {
        let e = here("/nonexistent/x", None).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        assert_eq!(
            resolve_program(OsStr::new("/opt/not/here"), None, RunsOn::Target).unwrap(),
            Path::new("/opt/not/here")
        );
        assert!(here("./no-such-file", None).is_err());
        assert!(
            resolve_program(OsStr::new("./no-such-file"), None, RunsOn::Target).is_err(),
            "relative paths are resolved here even for the target"
        );
        assert!(here("", None).unwrap_err().contains("empty"));
    }

    #[test]
    fn directories_and_files_without_execute_bits_are_refused() {
        let dir = std::env::temp_dir().join(format!("clusterctl-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-executable");
        std::fs::write(&file, "data").unwrap();
        let as_str = |p: &Path| OsString::from(p);
        let e = resolve_program(&as_str(&file), None, RunsOn::ThisMachine).unwrap_err();
        assert!(e.contains("Permission denied"), "{e}");
        let e = resolve_program(&as_str(&dir), None, RunsOn::ThisMachine).unwrap_err();
        assert!(e.contains("directory"), "{e}");
        // The same file, found through PATH, is skipped.
        let e = resolve_program(
            OsStr::new("not-executable"),
            Some(dir.as_os_str()),
            RunsOn::ThisMachine,
        )
        .unwrap_err();
        assert!(e.contains("not found in PATH"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
