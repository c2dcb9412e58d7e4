//! Which systemd the units are for. A few sandboxing settings (and the journald rate limit
//! settings) are newer than others, so gen-units needs the version of the machine that will
//! run the units: given with `--systemd-version N`, or read from `systemctl --version` on
//! this machine (`auto`). Reload is the same on every version (`Type=notify` +
//! `ExecReload=clusterctl reload --wait`): `Type=notify-reload` (253) cannot report a
//! rolled-back reload (SYSTEMD-FACTS.md, measured on 257).

use std::process::Command;

use crate::error::{Error, Result};

/// The first systemd with `LogRateLimitIntervalSec=`/`LogRateLimitBurst=`.
pub const LOG_RATE_LIMIT_SINCE: u32 = 240;

/// Refuses versions gen-units does not write units for.
pub fn check_supported(version: u32) -> Result<()> {
    crate::config::systemd_version_supported(version).map_err(Error::Config)
}

/// Parses the first line of `systemctl --version`: `systemd 252 (252.38-1~deb12u1)`,
/// `systemd 257 (257.2-3-arch)`, `systemd 219`, `systemd 258~rc2 (...)`.
pub fn parse_systemctl_version(output: &str) -> Result<u32, String> {
    let first = output.lines().next().unwrap_or("").trim();
    let mut words = first.split_whitespace();
    if words.next() != Some("systemd") {
        return Err(format!("unexpected first line {first:?}"));
    }
    let number = words.next().unwrap_or("");
    let digits = number
        .find(|c: char| !c.is_ascii_digit())
        .map_or(number, |end| &number[..end]);
    digits
        .parse()
        .map_err(|_| format!("no version number in {first:?}"))
}

/// Runs `systemctl --version` on this machine.
pub fn detect() -> Result<u32> {
    let fail = |why: String| {
        Error::config(format!(
            "cannot tell which systemd the units are for: `systemctl --version` {why}; \
             pass --systemd-version N (the version on the machine that will run the units, \
             e.g. 252 for Debian 12)"
        ))
    };
    let out = Command::new("systemctl")
        .arg("--version")
        .output()
        .map_err(|e| fail(format!("could not run: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!("failed ({})", out.status)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_systemctl_version(&text).map_err(|e| fail(format!("printed {e}")))?;
    check_supported(version)?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_outputs() {
        let cases = [
            (
                "systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT +SELINUX\n",
                252,
            ),
            ("systemd 257 (257.2-3-arch)\n+PAM", 257),
            ("systemd 249 (249.11-0ubuntu3.12)", 249),
            ("systemd 239 (239-78.el8)", 239),
            ("systemd 219\n +PAM", 219),
            ("systemd 258~rc2 (258~rc2-1)", 258),
            ("  systemd 255 (255.4-1ubuntu8)  \n", 255),
        ];
        for (text, want) in cases {
            assert_eq!(parse_systemctl_version(text), Ok(want), "{text:?}");
        }
        for bad in [
            "",
            "\n",
            "bash: systemctl: not found",
            "systemd",
            "systemd abc",
        ] {
            assert!(parse_systemctl_version(bad).is_err(), "{bad:?}");
        }
    }
}
