//! Where rendered units go: stdout (both files, each under a `# NAME` header, like
//! `systemctl cat`), or a directory. Writing checks both targets first, refuses to replace a
//! file with different content unless forced, and replaces each file atomically (temporary
//! file in the same directory, fsync, rename), so a reader never sees half a unit.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

use super::render::UnitFile;

/// Both files for stdout.
pub fn to_stdout_text(files: &[&UnitFile]) -> String {
    files
        .iter()
        .map(|f| format!("# {}\n{}", f.name, f.content))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Replaced,
    Unchanged,
}

/// What would happen to `path`, without changing anything.
fn plan(path: &Path, content: &str, force: bool) -> Result<Outcome> {
    match fs::read(path) {
        Ok(existing) if existing == content.as_bytes() => Ok(Outcome::Unchanged),
        Ok(_) if force => Ok(Outcome::Replaced),
        Ok(_) => Err(Error::config(format!(
            "{} exists with different content; not replacing it without --force",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Outcome::Created),
        Err(e) => Err(e).context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes `content` to `path` through a temporary file in the same directory.
fn replace_atomically(dir: &Path, path: &Path, name: &str, content: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(content.as_bytes())
            .and_then(|()| file.sync_all())
            .context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes all files into `dir`, or none if any of them may not be replaced.
pub fn write_files(
    dir: &Path,
    files: &[&UnitFile],
    force: bool,
) -> Result<Vec<(PathBuf, Outcome)>> {
    let meta =
        fs::metadata(dir).context(|| format!("cannot use output directory {}", dir.display()))?;
    if !meta.is_dir() {
        return Err(Error::config(format!(
            "output directory {} is not a directory",
            dir.display()
        )));
    }
    let mut planned = Vec::new();
    for f in files {
        let path = dir.join(&f.name);
        let outcome = plan(&path, &f.content, force)?;
        planned.push((path, outcome, *f));
    }
    for (path, outcome, f) in &planned {
        if *outcome != Outcome::Unchanged {
            replace_atomically(dir, path, &f.name, &f.content)?;
        }
    }
    if planned.iter().any(|(_, o, _)| *o != Outcome::Unchanged) {
        // Make the renames durable; failing here loses nothing already reported.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(planned.into_iter().map(|(p, o, _)| (p, o)).collect())
}

/// Directories systemd loads units from; anything else needs copying or `systemctl link`.
fn is_unit_dir(dir: &Path, user_units: bool) -> bool {
    let Ok(dir) = fs::canonicalize(dir) else {
        return false;
    };
    if user_units {
        let home_config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
        home_config.is_some_and(|c| dir == c.join("systemd/user"))
            || dir == Path::new("/etc/systemd/user")
    } else {
        [
            "/etc/systemd/system",
            "/run/systemd/system",
            "/usr/lib/systemd/system",
            "/lib/systemd/system",
        ]
        .iter()
        .any(|d| dir == Path::new(d))
    }
}

/// The commands to run after writing, for stderr.
pub fn next_steps(app: &str, dir: &Path, user_units: bool) -> String {
    let (ctl, journal) = if user_units {
        ("systemctl --user", "journalctl --user")
    } else {
        ("systemctl", "journalctl")
    };
    let mut steps: Vec<(String, &str)> = Vec::new();
    if !is_unit_dir(dir, user_units) {
        let target = if user_units {
            "~/.config/systemd/user/"
        } else {
            "/etc/systemd/system/"
        };
        steps.push((
            format!(
                "cp {d}/{app}.socket {d}/{app}.service {target}",
                d = dir.display()
            ),
            "install them",
        ));
    }
    steps.push((format!("{ctl} daemon-reload"), ""));
    steps.push((
        format!("{ctl} enable --now {app}.socket"),
        "listen now; the workers start on the first connection",
    ));
    steps.push((
        format!("{ctl} enable --now {app}.service"),
        "or: start the workers now and at boot",
    ));
    steps.push((
        format!("{ctl} reload {app}"),
        "new workers, no connection dropped",
    ));
    steps.push((format!("{journal} -u {app}"), "the logs"));
    let width = steps.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    let mut s = String::from("Next steps:\n");
    for (cmd, why) in steps {
        if why.is_empty() {
            let _ = writeln!(s, "  {cmd}");
        } else {
            let _ = writeln!(s, "  {cmd:<width$}  # {why}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("clusterctl-output-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn file(name: &str, content: &str) -> UnitFile {
        UnitFile {
            name: name.into(),
            content: content.into(),
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_then_unchanged_then_refuses_then_forces() {
        let dir = temp_dir("cycle");
        let (a, b) = (file("x.socket", "A\n"), file("x.service", "B\n"));
        let r = write_files(&dir, &[&a, &b], false).unwrap();
        assert!(r.iter().all(|(_, o)| *o == Outcome::Created));
        assert_eq!(listing(&dir), ["x.service", "x.socket"]);
        let mode = fs::metadata(dir.join("x.socket")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o644
        );

        let r = write_files(&dir, &[&a, &b], false).unwrap();
        assert!(r.iter().all(|(_, o)| *o == Outcome::Unchanged));

        // The service differs: nothing is written, not even the socket that also changed.
        let (a2, b2) = (file("x.socket", "A2\n"), file("x.service", "B2\n"));
        let err = write_files(&dir, &[&a2, &b2], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(matches!(err, Error::Config(_)));
        assert_eq!(fs::read_to_string(dir.join("x.socket")).unwrap(), "A\n");
        assert_eq!(fs::read_to_string(dir.join("x.service")).unwrap(), "B\n");

        let r = write_files(&dir, &[&a2, &b], true).unwrap();
        assert_eq!(r[0].1, Outcome::Replaced);
        assert_eq!(r[1].1, Outcome::Unchanged);
        assert_eq!(fs::read_to_string(dir.join("x.socket")).unwrap(), "A2\n");
        assert_eq!(
            listing(&dir),
            ["x.service", "x.socket"],
            "no temporary files left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_bad_directory() {
        let dir = temp_dir("missing");
        let a = file("x.socket", "A\n");
        assert!(write_files(&dir.join("nope"), &[&a], false).is_err());
        fs::write(dir.join("plain"), "").unwrap();
        assert!(write_files(&dir.join("plain"), &[&a], false).is_err());
        // A directory where the unit file should be: an error, nothing written.
        fs::create_dir(dir.join("x.service")).unwrap();
        let b = file("x.service", "B\n");
        assert!(write_files(&dir, &[&a, &b], true).is_err());
        assert!(!dir.join("x.socket").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdout_format() {
        let (a, b) = (file("x.socket", "A\n"), file("x.service", "B\n"));
        assert_eq!(
            to_stdout_text(&[&a, &b]),
            "# x.socket\nA\n\n# x.service\nB\n"
        );
    }

    #[test]
    fn steps_for_system_and_user() {
        let s = next_steps("demo", Path::new("/etc/systemd/system"), false);
        assert!(s.contains("systemctl daemon-reload"));
        assert!(s.contains("systemctl enable --now demo.socket"));
        assert!(s.contains("systemctl reload demo"));
        assert!(s.contains("journalctl -u demo"));
        let s = next_steps("demo", Path::new("/nonexistent/dir"), true);
        assert!(s.contains("systemctl --user daemon-reload"));
        assert!(s.contains("journalctl --user -u demo"));
        assert!(s.contains("cp /nonexistent/dir/demo.socket"));
    }
}
