//! The worker program: resolved through PATH once at start, so that a typo is a clear
//! configuration error (exit 78) instead of a crash loop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Finds the worker program now, so that a typo is a clear configuration error at start.
pub(super) fn resolve_command(cmd: &OsString) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let check = |p: &Path| -> std::result::Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            return Err("is a directory".into());
        }
        // access(X_OK) succeeds for root whenever any execute bit is set, and for a file
        // with none, execve fails even for root.
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
            return Err(std::io::Error::from_raw_os_error(nix::libc::EACCES).to_string());
        }
        nix::unistd::access(p, nix::unistd::AccessFlags::X_OK)
            .map_err(|e| std::io::Error::from(e).to_string())
    };
    let shown = Path::new(cmd).display().to_string();
    if cmd.as_bytes().contains(&b'/') {
        let p = PathBuf::from(cmd);
        check(&p)
            .map_err(|e| Error::config(format!("cannot execute worker command {shown:?}: {e}")))?;
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(cmd);
        if check(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(Error::config(format!(
        "worker command {shown:?} not found in PATH ({}): No such file or directory",
        path.to_string_lossy()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_resolution() {
        assert!(resolve_command(&"sh".into()).unwrap().is_absolute());
        let e = resolve_command(&"no-such-command-xyz".into()).unwrap_err();
        assert!(e.to_string().contains("no-such-command-xyz"));
        assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
        let dir = std::env::temp_dir().join(format!("clusterctl-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-executable");
        std::fs::write(&file, "data").unwrap();
        let e = resolve_command(&file.clone().into()).unwrap_err();
        assert!(e.to_string().contains("Permission denied"), "{e}");
        let e = resolve_command(&dir.clone().into()).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let e = resolve_command(&"/nonexistent/x".into()).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
