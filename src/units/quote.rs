//! systemd's quoting rules, applied to every value gen-units writes into a unit file.
//!
//! A unit file line goes through up to four steps before a value reaches the service
//! (systemd.syntax(7), systemd.service(5) "Command lines", systemd.unit(5) "Specifiers"):
//! 1. the line is read: leading/trailing whitespace is stripped and a trailing `\` joins the
//!    next line;
//! 2. Exec*= and Environment= values are split into words, unquoted and C-unescaped;
//! 3. `%` specifiers are expanded in each word (almost every directive);
//! 4. Exec*= words get `$VARIABLE` expansion when the command runs.
//!
//! Each function here undoes exactly the steps its directive applies, so a value arrives byte
//! for byte. Control characters (newline, tab, ...) are refused: they cannot appear on a unit
//! file line. The oracle in `unquote.rs` (tests only) re-implements steps 2–4 to prove it.

/// Characters a word may contain without quotes: nothing that systemd's word splitter,
/// C unescaper or `;` separator check treats specially. `%` and `$` are listed because they
/// are doubled before this check.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '_' | '@' | '%' | '$' | '+' | '=' | ':' | ',' | '.' | '/' | '-'
        )
}

/// Names a character that no unit file line can carry.
fn describe_control(c: char) -> String {
    match c {
        '\n' => "a newline".into(),
        '\t' => "a tab".into(),
        '\r' => "a carriage return".into(),
        _ => format!("the control character U+{:04X}", u32::from(c)),
    }
}

/// Refuses control characters (C0, DEL and C1): unit files are line based, and systemd
/// refuses control characters in commands and most values.
pub fn check_text(s: &str) -> Result<(), String> {
    match s.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "contains {}, which a unit file cannot carry",
            describe_control(c)
        )),
        None => Ok(()),
    }
}

/// Wraps `s` in double quotes, escaping `"` and `\` (the only characters special inside
/// double quotes once control characters are excluded).
fn double_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// One argument of an Exec*= command line (not the first word): `%` → `%%`, `$` → `$$`, and
/// double quotes around anything that is empty or not plain (spaces, quotes, backslashes,
/// `;`, non-ASCII, ...).
pub fn exec_arg(s: &str) -> Result<String, String> {
    check_text(s)?;
    let escaped = s.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty() && escaped.chars().all(is_plain) {
        Ok(escaped)
    } else {
        Ok(double_quote(&escaped))
    }
}

/// The program path, the first word of an Exec*= line. systemd refuses quotes and
/// backslashes in it after unquoting, and it is not `$`-expanded like the other words, so
/// those are refused here; `%` is still a specifier. Spaces are allowed (quoted).
pub fn exec_path(p: &str) -> Result<String, String> {
    check_text(p)?;
    if !p.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if let Some(c) = p.chars().find(|c| matches!(c, '"' | '\'' | '\\' | '$')) {
        return Err(format!(
            "contains {c:?}, which systemd does not accept in the path of a command"
        ));
    }
    let escaped = p.replace('%', "%%");
    if escaped.chars().all(is_plain) {
        Ok(escaped)
    } else {
        Ok(double_quote(&escaped))
    }
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, as systemd, POSIX shells
/// and `EnvironmentFile=` accept it.
pub fn check_env_name(key: &str) -> Result<(), String> {
    let mut chars = key.chars();
    let valid_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if valid_first && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "{key:?} is not a valid environment variable name (letters, digits and '_', \
             not starting with a digit)"
        ))
    }
}

/// One `Environment=` assignment, always quoted as a whole: `"KEY=VALUE"`. Environment=
/// unquotes and expands specifiers (`%` → `%%`) but does no `$` expansion, so `$` stays.
pub fn env_assignment(key: &str, value: &str) -> Result<String, String> {
    check_env_name(key)?;
    check_text(value)?;
    Ok(double_quote(&format!("{key}={}", value.replace('%', "%%"))))
}

/// A value systemd takes literally except for specifiers: Description=, WorkingDirectory=,
/// EnvironmentFile=, ListenStream=. No unquoting happens, so quotes and backslashes are
/// kept as they are; what the line reader would change (surrounding spaces, a trailing
/// backslash that joins lines, an empty value that resets the setting) is refused.
pub fn literal(s: &str) -> Result<String, String> {
    check_text(s)?;
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.starts_with(' ') || s.ends_with(' ') {
        return Err("starts or ends with a space, which systemd strips".into());
    }
    if s.ends_with('\\') {
        return Err("ends with a backslash, which systemd reads as a line continuation".into());
    }
    Ok(s.replace('%', "%%"))
}

/// A POSIX shell word, for the invocation shown in the generated files' header comment:
/// plain words as they are, everything else in single quotes.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| is_plain(c) && c != '$') {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::unquote::{parse_command_line, parse_env_line, resolve_literal};

    /// Every argument arrives unchanged through systemd's parser (as re-implemented by the
    /// oracle), alone and between other words.
    fn round_trip(arg: &str) {
        let quoted = exec_arg(arg).unwrap();
        let line = format!("/usr/bin/x {quoted} end");
        let argv = parse_command_line(&line)
            .unwrap_or_else(|e| panic!("{arg:?} rendered as {quoted}: oracle error {e}"));
        assert_eq!(
            argv,
            ["/usr/bin/x", arg, "end"],
            "{arg:?} rendered as {quoted}"
        );
    }

    const TRICKY: &[&str] = &[
        "",
        " ",
        "plain",
        "two words",
        "100%",
        "%%",
        "%t",
        "%i%n",
        "$HOME",
        "${HOME}",
        "$$",
        "$",
        "a$b",
        "\"",
        "say \"hi\"",
        "'",
        "it's",
        "'single'",
        "\\",
        "back\\slash",
        "\\\\",
        "ends\\",
        "\\n",
        "\\x41",
        ";",
        "\\;",
        "a;b",
        "; ",
        "#comment",
        "-flag",
        "--opt=a b",
        "naïve",
        "日本語",
        "emoji 🦀",
        "\u{a0}nbsp",
        "=",
        "{}",
        "*?[]",
        "<>|&",
        "`cmd`",
        "~",
        "a\"b'c\\d%e$f g",
    ];

    #[test]
    fn tricky_arguments_round_trip() {
        for arg in TRICKY {
            round_trip(arg);
        }
    }

    #[test]
    fn expected_renderings() {
        let cases = [
            ("plain", "plain"),
            ("", "\"\""),
            ("two words", "\"two words\""),
            ("100%", "100%%"),
            ("$HOME", "$$HOME"),
            ("${X}", "\"$${X}\""),
            ("say \"hi\"", r#""say \"hi\"""#),
            ("it's", r#""it's""#),
            ("back\\slash", r#""back\\slash""#),
            (";", "\";\""),
            ("naïve", "\"naïve\""),
            ("--port=8080", "--port=8080"),
            ("a%b $c", "\"a%%b $$c\""),
        ];
        for (arg, want) in cases {
            assert_eq!(exec_arg(arg).unwrap(), want, "{arg:?}");
        }
    }

    #[test]
    fn control_characters_are_refused() {
        for (bad, what) in [
            ("a\nb", "newline"),
            ("tab\there", "tab"),
            ("cr\r", "carriage return"),
            ("nul\0", "U+0000"),
            ("bell\x07", "U+0007"),
            ("del\x7f", "U+007F"),
            ("c1\u{85}", "U+0085"),
        ] {
            let err = exec_arg(bad).unwrap_err();
            assert!(err.contains(what), "{bad:?}: {err}");
            assert!(literal(bad).is_err());
            assert!(env_assignment("K", bad).is_err());
            assert!(exec_path(&format!("/x{bad}")).is_err());
        }
    }

    /// A deterministic pseudo-random sweep over strings built from the characters that
    /// matter, to catch interactions the hand-written cases miss.
    #[test]
    fn generated_arguments_round_trip() {
        const ALPHABET: &[char] = &[
            'a', ' ', '"', '\'', '\\', '%', '$', ';', '{', '}', 'é', 'x', 'n', 't', '#', '=',
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = usize::try_from(next() % 8).unwrap();
            let s: String = (0..len)
                .map(|_| ALPHABET[usize::try_from(next() % 16).unwrap()])
                .collect();
            round_trip(&s);
            let env = env_assignment("K", &s).unwrap();
            assert_eq!(
                parse_env_line(&env).unwrap(),
                [format!("K={s}")],
                "{s:?} as {env}"
            );
        }
    }

    #[test]
    fn program_paths() {
        assert_eq!(
            exec_path("/usr/bin/clusterctl").unwrap(),
            "/usr/bin/clusterctl"
        );
        assert_eq!(
            exec_path("/opt/my app/clusterctl").unwrap(),
            "\"/opt/my app/clusterctl\""
        );
        assert_eq!(exec_path("/opt/100%/x").unwrap(), "/opt/100%%/x");
        let argv = parse_command_line(&exec_path("/opt/my app/100%/x").unwrap()).unwrap();
        assert_eq!(argv, ["/opt/my app/100%/x"]);
        for bad in ["relative/x", "x", "/a\"b", "/a'b", "/a\\b", "/a$b", ""] {
            assert!(exec_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn environment_assignments() {
        assert_eq!(env_assignment("A", "b").unwrap(), "\"A=b\"");
        assert_eq!(
            env_assignment("GREETING", "say \"hi\" to $USER 100%\\").unwrap(),
            r#""GREETING=say \"hi\" to $USER 100%%\\""#
        );
        assert_eq!(env_assignment("EMPTY", "").unwrap(), "\"EMPTY=\"");
        assert_eq!(env_assignment("X", "a=b").unwrap(), "\"X=a=b\"");
        for bad in ["", "1A", "A-B", "A B", "Ä", "A=B"] {
            assert!(env_assignment(bad, "v").is_err(), "{bad:?}");
        }
        for good in ["_", "A1", "_x_Y"] {
            assert!(check_env_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn literal_values() {
        assert_eq!(literal("/srv/my app").unwrap(), "/srv/my app");
        assert_eq!(literal("100% \"real\"").unwrap(), "100%% \"real\"");
        assert_eq!(
            resolve_literal(&literal("50% off, \\o/ 'x'").unwrap()).unwrap(),
            "50% off, \\o/ 'x'"
        );
        for bad in ["", " lead", "trail ", "cont\\", "a\nb"] {
            assert!(literal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("plain-word"), "plain-word");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("$HOME"), "'$HOME'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
