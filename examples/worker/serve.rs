//! One connection: read requests, answer them, keep alive or close (gracefully, with a
//! linger); `Connection: close` once the worker drains.

use super::{
    Conn, Head, Input, Instant, KEEPALIVE_IDLE, LINGER, MAX_BODY, MAX_HEAD, READ_TICK,
    REQUEST_TIMEOUT, Request, Route, Shared, WRITE_TIMEOUT, Write, parse_head, read_some, thread,
};

/// Serves one connection until it closes, fails, idles out or the drain ends it.
pub(crate) fn serve_connection(mut conn: Conn, body: &[u8], shared: &Shared) {
    if conn.configure(READ_TICK, WRITE_TIMEOUT, true).is_err() {
        return;
    }
    let mut buf = vec![0_u8; MAX_HEAD];
    let mut out = Vec::with_capacity(256);
    let mut filled = 0;
    let mut idle_since = Instant::now();
    let mut head_started = Instant::now();
    loop {
        if filled > 0 {
            match parse_head(&buf[..filled]) {
                Head::Complete(req) => {
                    if !handle_request(
                        &mut conn,
                        &req,
                        &mut buf,
                        &mut filled,
                        &mut out,
                        body,
                        shared,
                    ) {
                        return;
                    }
                    idle_since = Instant::now();
                    head_started = idle_since;
                    continue;
                }
                Head::Bad(status) => {
                    respond_error(&mut conn, &mut out, status);
                    return;
                }
                Head::Partial if filled == buf.len() => {
                    respond_error(&mut conn, &mut out, "431 Request Header Fields Too Large");
                    return;
                }
                Head::Partial => {}
            }
        }
        match read_some(&mut conn, &mut buf[filled..]) {
            Input::Data(n) => {
                if filled == 0 {
                    head_started = Instant::now();
                }
                filled += n;
            }
            Input::Tick => {
                // An idle keep-alive connection is closed during the drain once a whole
                // read tick passed without a byte: closing right after the last response
                // would race with a client that is already sending its next request.
                let expired = if filled == 0 {
                    shared.draining() || idle_since.elapsed() >= KEEPALIVE_IDLE
                } else {
                    head_started.elapsed() >= REQUEST_TIMEOUT
                };
                if expired {
                    return;
                }
            }
            Input::Closed => return,
        }
    }
}

/// Reads the body of `req`, answers it and keeps any pipelined bytes that follow in `buf`.
/// Returns whether the connection stays open.
pub(crate) fn handle_request(
    conn: &mut Conn,
    req: &Request,
    buf: &mut [u8],
    filled: &mut usize,
    out: &mut Vec<u8>,
    body: &[u8],
    shared: &Shared,
) -> bool {
    if req.content_length > MAX_BODY {
        respond_error(conn, out, "413 Content Too Large");
        return false;
    }
    let buffered = *filled - req.head_len;
    match usize::try_from(req.content_length) {
        Ok(len) if len <= buffered => {
            let used = req.head_len + len;
            buf.copy_within(used..*filled, 0);
            *filled -= used;
        }
        _ => {
            *filled = 0;
            let remaining = req.content_length - buffered as u64;
            if req.expect_continue && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                return false;
            }
            if !discard_body(conn, buf, remaining) {
                return false;
            }
        }
    }

    let payload: &[u8] = match req.route {
        Route::Health => b"ok\n",
        Route::Info => body,
        Route::Sleep(pause) => {
            thread::sleep(pause);
            body
        }
    };
    // Checked after the work: a response finished during the drain closes the connection.
    let keep_alive = req.keep_alive && !shared.draining();
    let connection = match (keep_alive, req.minor) {
        (false, _) => "Connection: close\r\n",
        (true, 0) => "Connection: keep-alive\r\n",
        (true, _) => "",
    };
    build_response(out, "200 OK", connection, payload, req.head_only);
    if conn.write_all(out).is_err() {
        return false;
    }
    if !keep_alive {
        close_gracefully(conn);
    }
    keep_alive
}

/// Reads and drops `remaining` body bytes; false if the client stalls or goes away.
pub(crate) fn discard_body(conn: &mut Conn, buf: &mut [u8], mut remaining: u64) -> bool {
    let mut progress = Instant::now();
    while remaining > 0 {
        let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        match read_some(conn, &mut buf[..want]) {
            Input::Data(n) => {
                remaining -= n as u64;
                progress = Instant::now();
            }
            Input::Tick if progress.elapsed() < REQUEST_TIMEOUT => {}
            Input::Tick | Input::Closed => return false,
        }
    }
    true
}

pub(crate) fn build_response(
    out: &mut Vec<u8>,
    status: &str,
    connection: &str,
    payload: &[u8],
    head: bool,
) {
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n",
        payload.len()
    );
    if !head {
        out.extend_from_slice(payload);
    }
}

pub(crate) fn respond_error(conn: &mut Conn, out: &mut Vec<u8>, status: &str) {
    let mut payload = status.to_ascii_lowercase().into_bytes();
    payload.push(b'\n');
    build_response(out, status, "Connection: close\r\n", &payload, false);
    if conn.write_all(out).is_ok() {
        close_gracefully(conn);
    }
}

/// Ends the connection after a final response without resetting it: half-close, then
/// read (and drop) what the client still sends until it closes, for at most `LINGER`.
pub(crate) fn close_gracefully(conn: &mut Conn) {
    conn.shutdown_write();
    let deadline = Instant::now() + LINGER;
    let mut scratch = [0_u8; 4096];
    while Instant::now() < deadline {
        if let Input::Closed = read_some(conn, &mut scratch) {
            break;
        }
    }
}
