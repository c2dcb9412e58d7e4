//! HTTP/1.1 request heads: parsing (request line, headers, keep-alive rules, body length)
//! and the routes; strict and bounded.

use super::{Conn, Duration, MAX_SLEEP_MS, Read, io};

/// A parsed request head, reduced to what the worker needs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// Bytes of the head in the buffer, including leading empty lines and the final CRLF.
    pub(crate) head_len: usize,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) minor: u8,
    pub(crate) keep_alive: bool,
    pub(crate) head_only: bool,
    pub(crate) content_length: u64,
    pub(crate) expect_continue: bool,
    pub(crate) route: Route,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Info,
    Health,
    Sleep(Duration),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Head {
    Complete(Request),
    Partial,
    Bad(&'static str),
}

pub(crate) const BAD_REQUEST: &str = "400 Bad Request";
pub(crate) const VERSION_NOT_SUPPORTED: &str = "505 HTTP Version Not Supported";
pub(crate) const NOT_IMPLEMENTED: &str = "501 Not Implemented";

/// Parses the request head at the start of `data`.
pub(crate) fn parse_head(data: &[u8]) -> Head {
    let mut start = 0;
    while data[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let rest = &data[start..];
    let Some(end) = find(rest, b"\r\n\r\n") else {
        // Reject a garbage request line as soon as it is complete.
        if let Some(eol) = rest.iter().position(|&b| b == b'\n')
            && parse_request_line(strip_cr(&rest[..eol])).is_err()
        {
            return Head::Bad(BAD_REQUEST);
        }
        return Head::Partial;
    };
    let head = &rest[..end];
    let mut lines = head.split(|&b| b == b'\n').map(strip_cr);
    let Some(first) = lines.next() else {
        return Head::Bad(BAD_REQUEST);
    };
    let (method, target, minor) = match parse_request_line(first) {
        Ok(parts) => parts,
        Err(status) => return Head::Bad(status),
    };

    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Head::Bad(BAD_REQUEST);
        };
        let name = &line[..colon];
        let value = trim_ows(&line[colon + 1..]);
        if name.is_empty()
            || !name.iter().copied().all(is_tchar)
            || value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            // Also rejects obsolete line folding (a line starting with whitespace).
            return Head::Bad(BAD_REQUEST);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(len) = parse_decimal(value) else {
                return Head::Bad(BAD_REQUEST);
            };
            if content_length.is_some_and(|l| l != len) {
                return Head::Bad(BAD_REQUEST);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Head::Bad(NOT_IMPLEMENTED);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
    }

    Head::Complete(Request {
        head_len: start + end + 4,
        minor,
        keep_alive: !close && (minor == 1 || keep_alive),
        head_only: method == b"HEAD",
        content_length: content_length.unwrap_or(0),
        expect_continue: expect_continue && minor == 1,
        route: route(target),
    })
}

/// Splits `METHOD SP target SP HTTP/1.x`.
pub(crate) fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], u8), &'static str> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD_REQUEST);
    };
    if method.is_empty() || method.len() > 32 || !method.iter().copied().all(is_tchar) {
        return Err(BAD_REQUEST);
    }
    if target.is_empty() || target.iter().any(|&b| b <= 0x20 || b == 0x7f) {
        return Err(BAD_REQUEST);
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(VERSION_NOT_SUPPORTED);
        }
        _ => return Err(BAD_REQUEST),
    };
    Ok((method, target, minor))
}

pub(crate) fn route(target: &[u8]) -> Route {
    // Absolute form (`http://host/path`) becomes its path; query and fragment are dropped.
    let mut path = target;
    if let Some(scheme_end) = find(path, b"://") {
        let after = &path[scheme_end + 3..];
        path = after
            .iter()
            .position(|&b| b == b'/')
            .map_or(&b"/"[..], |slash| &after[slash..]);
    }
    if let Some(end) = path.iter().position(|&b| b == b'?' || b == b'#') {
        path = &path[..end];
    }
    if path == b"/health" {
        return Route::Health;
    }
    if let Some(ms) = path.strip_prefix(b"/sleep/")
        && !ms.is_empty()
        && ms.iter().all(u8::is_ascii_digit)
    {
        let ms = parse_decimal(ms).unwrap_or(MAX_SLEEP_MS).min(MAX_SLEEP_MS);
        return Route::Sleep(Duration::from_millis(ms));
    }
    Route::Info
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

pub(crate) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Outcome of waiting for more bytes from the client.
pub(crate) enum Input {
    Data(usize),
    /// Nothing arrived within `READ_TICK`.
    Tick,
    /// End of stream or an error: the connection is over.
    Closed,
}

pub(crate) fn read_some(conn: &mut Conn, buf: &mut [u8]) -> Input {
    loop {
        return match conn.read(buf) {
            Ok(0) => Input::Closed,
            Ok(n) => Input::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Input::Tick
            }
            Err(_) => Input::Closed,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(data: &[u8]) -> Request {
        match parse_head(data) {
            Head::Complete(req) => req,
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn parses_keep_alive_rules() {
        assert!(complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn parses_routes_and_lengths() {
        let req = complete(b"\r\nPOST /sleep/25?x=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(req.route, Route::Sleep(Duration::from_millis(25)));
        assert_eq!(req.content_length, 5);
        assert_eq!(req.head_len, 52);
        assert_eq!(
            complete(b"GET /sleep/99999999999999999999999 HTTP/1.1\r\n\r\n").route,
            Route::Sleep(Duration::from_millis(MAX_SLEEP_MS))
        );
        assert_eq!(
            complete(b"GET /health HTTP/1.1\r\n\r\n").route,
            Route::Health
        );
        assert_eq!(
            complete(b"GET http://h/health HTTP/1.1\r\n\r\n").route,
            Route::Health
        );
        assert_eq!(
            complete(b"GET /sleep/x HTTP/1.1\r\n\r\n").route,
            Route::Info
        );
        assert!(complete(b"HEAD / HTTP/1.1\r\n\r\n").head_only);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Head::Partial);
        assert_eq!(parse_head(b"hello world\r\n"), Head::Bad(BAD_REQUEST));
        assert_eq!(parse_head(b"\x16\x03\x01\x02\n"), Head::Bad(BAD_REQUEST));
        assert_eq!(
            parse_head(b"GET / HTTP/2.0\r\n\r\n"),
            Head::Bad(VERSION_NOT_SUPPORTED)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Head::Bad(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Head::Bad(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\n folded\r\n\r\n"),
            Head::Bad(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Head::Bad(NOT_IMPLEMENTED)
        );
    }
}
