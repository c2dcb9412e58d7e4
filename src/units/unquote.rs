//! Test oracle: systemd's reading of Exec*=, Environment= and literal values, re-implemented
//! from systemd.syntax(7), systemd.service(5) "Command lines" and systemd 252's
//! `extract_first_word()` / `config_parse_exec()` / `replace_env_argv()`, so the quoting in
//! `quote.rs` can be checked against an independent reader. Deliberately strict: anything
//! gen-units should never produce (unknown escapes, unknown specifiers, variable references,
//! several commands) is an error rather than a guess. The integration test checks the same
//! property against the real parser (`systemd --test`).

/// Splits one word off `s` the way `extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)`
/// does: quotes may start anywhere in a word, backslash escapes work inside and outside
/// quotes. Returns the word and the rest, or `None` at the end of input.
fn next_word(s: &str) -> Result<Option<(String, &str)>, String> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r']);
    if s.is_empty() {
        return Ok(None);
    }
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (_, '\\') => {
                let rest = &s[i + 1..];
                let (decoded, used) = cunescape_one(rest)?;
                word.push(decoded);
                for _ in 0..used {
                    chars.next();
                }
            }
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, ' ' | '\t' | '\n' | '\r') => return Ok(Some((word, &s[i..]))),
            (_, c) => word.push(c),
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in {s:?}"));
    }
    Ok(Some((word, "")))
}

/// One C escape after a backslash (systemd.syntax(7), table 1): the character and how many
/// characters of `rest` it used.
fn cunescape_one(rest: &str) -> Result<(char, usize), String> {
    let mut it = rest.chars();
    let c = it.next().ok_or("backslash at end of line")?;
    let simple = match c {
        'a' => Some('\x07'),
        'b' => Some('\x08'),
        'f' => Some('\x0c'),
        'n' => Some('\n'),
        'r' => Some('\r'),
        't' => Some('\t'),
        'v' => Some('\x0b'),
        '\\' => Some('\\'),
        '"' => Some('"'),
        '\'' => Some('\''),
        's' => Some(' '),
        _ => None,
    };
    if let Some(d) = simple {
        return Ok((d, 1));
    }
    let (radix, digits) = match c {
        'x' => (16, 2),
        'u' => (16, 4),
        'U' => (16, 8),
        '0'..='7' => (8, 3),
        _ => return Err(format!("unknown escape sequence \\{c}")),
    };
    let skip = usize::from(c != '0' && !c.is_ascii_digit());
    let text: String = rest.chars().skip(skip).take(digits).collect();
    let code = u32::from_str_radix(&text, radix)
        .ok()
        .filter(|_| text.len() == digits)
        .ok_or_else(|| format!("bad escape \\{c}{text}"))?;
    if code == 0 {
        return Err("\\0 escapes are refused".into());
    }
    let ch = char::from_u32(code).ok_or_else(|| format!("bad code point {code:#x}"))?;
    Ok((ch, skip + digits))
}

/// Expands `%` specifiers as systemd does after unquoting: `%%` → `%`, `%t` → `/run` (the
/// system manager's value); any other specifier is an error here.
fn resolve_specifiers(word: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = word.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('t') => out.push_str("/run"),
            other => return Err(format!("unexpected specifier %{other:?} in {word:?}")),
        }
    }
    Ok(out)
}

/// `$` handling when the command runs (`replace_env_argv()` in systemd 252): a word that is
/// exactly `$NAME` is replaced by the variable split at whitespace, `${NAME}` anywhere by its
/// value, `$$` by `$`; a lone `$` stays. References are errors here.
fn expand_dollars(word: &str) -> Result<String, String> {
    if word.len() > 1 && word.starts_with('$') && !word[1..].starts_with(['{', '$']) {
        return Err(format!("{word:?} would be expanded as a variable"));
    }
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            match chars.peek() {
                Some('$') => {
                    chars.next();
                }
                Some('{') => return Err(format!("{word:?} contains a ${{VARIABLE}} reference")),
                _ => {}
            }
        }
        out.push(c);
    }
    Ok(out)
}

/// The argv an `ExecStart=` value runs, after unquoting, specifiers and `$` expansion.
pub fn parse_command_line(line: &str) -> Result<Vec<String>, String> {
    let mut argv = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if argv.is_empty() {
            if let Some(c) = rest.chars().next().filter(|c| "-@:+!".contains(*c)) {
                return Err(format!("command starts with the prefix {c:?}"));
            }
        } else {
            // An unquoted lone ';' separates commands; "\;" is a literal ';' argument.
            let boundary = |s: &str| s.is_empty() || s.starts_with([' ', '\t']);
            if let Some(after) = rest.strip_prefix(';').filter(|a| boundary(a)) {
                return Err(format!("';' starts a second command before {after:?}"));
            }
            if let Some(after) = rest.strip_prefix("\\;").filter(|a| boundary(a)) {
                argv.push(";".to_string());
                rest = after;
                continue;
            }
        }
        let Some((word, after)) = next_word(rest)? else {
            break;
        };
        rest = after;
        let word = resolve_specifiers(&word)?;
        if argv.is_empty() {
            if word.contains(['"', '\'', '\\']) {
                return Err(format!("unsafe program path {word:?}"));
            }
            argv.push(word);
        } else {
            argv.push(expand_dollars(&word)?);
        }
    }
    if argv.is_empty() {
        return Err("empty command line".into());
    }
    Ok(argv)
}

/// The assignments one `Environment=` value makes (no `$` expansion there).
pub fn parse_env_line(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some((word, after)) = next_word(rest)? {
        rest = after;
        let word = resolve_specifiers(&word)?;
        if !word.contains('=') {
            return Err(format!("{word:?} is not an assignment"));
        }
        out.push(word);
    }
    Ok(out)
}

/// A value systemd takes literally apart from specifiers (Description=, WorkingDirectory=).
pub fn resolve_literal(value: &str) -> Result<String, String> {
    resolve_specifiers(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples from systemd.service(5) and systemd.syntax(7), read by the oracle.
    #[test]
    fn man_page_examples() {
        assert_eq!(
            parse_command_line(r#"/bin/echo "a b" 'c"d' "e\\f" x\;y"#).unwrap_err(),
            "unknown escape sequence \\;"
        );
        assert_eq!(
            parse_command_line(r"/bin/echo / >/dev/null & \; ls").unwrap(),
            ["/bin/echo", "/", ">/dev/null", "&", ";", "ls"]
        );
        assert!(parse_command_line("/bin/echo one ; echo two").is_err());
        assert_eq!(
            parse_command_line(r#"/bin/x "" '' a"b c"d "\x41\101\u00e9\s""#).unwrap(),
            ["/bin/x", "", "", "ab cd", "AAé "]
        );
        assert_eq!(
            parse_command_line("/bin/x %% %t/app $$HOME a$b $").unwrap(),
            ["/bin/x", "%", "/run/app", "$HOME", "a$b", "$"]
        );
        assert!(parse_command_line("/bin/x $HOME").is_err());
        assert!(parse_command_line("/bin/x a${HOME}").is_err());
        assert!(parse_command_line("/bin/x %i").is_err());
        assert!(parse_command_line("-/bin/x").is_err());
        assert!(parse_command_line("/bin/x \"open").is_err());
        assert_eq!(
            parse_env_line(r#""VAR1=word1 word2" VAR2=word3 "VAR3=$word 5 6""#).unwrap(),
            ["VAR1=word1 word2", "VAR2=word3", "VAR3=$word 5 6"]
        );
    }
}
