//! A bounded HTTP load client for zero-downtime tests: a few threads sending GETs to
//! 127.0.0.1 on fresh and on keep-alive connections until told to stop (or a time and
//! count limit), counting every failed connect, reset, short or bad response.
//!
//! Failures are counted by kind: `connect_failed` (refused or otherwise not connected),
//! `reset` (ECONNRESET or another read/write error), `short` (EOF before the whole answer),
//! `timed_out` (no answer within 30 s, or a connect that timed out), `bad_status`.
//!
//! Like every real HTTP client (RFC 9112 §9.3.1), a request on a *reused* keep-alive
//! connection that the server closed before sending any byte of the answer is retried once
//! on a fresh connection; those retries are counted separately, not as failures.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Counts {
    pub ok: AtomicU64,
    pub connect_failed: AtomicU64,
    pub reset: AtomicU64,
    pub short: AtomicU64,
    pub bad_status: AtomicU64,
    pub timed_out: AtomicU64,
    pub retried: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub ok: u64,
    pub failed: u64,
    pub connect_failed: u64,
    pub reset: u64,
    pub short: u64,
    pub bad_status: u64,
    pub timed_out: u64,
    pub retried: u64,
    /// Sample of failure descriptions.
    pub errors: Vec<String>,
    /// Distinct `generation=` values seen in answers.
    pub generations: Vec<String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    errors: Arc<Mutex<Vec<String>>>,
    generations: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// At most two load generators run at once (see `support::LOAD_GENERATORS`).
    _permit: crate::support::Permit<'static>,
}

/// How long a request may wait for its answer before it counts as timed out.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

enum Outcome {
    Ok(String),
    /// Closed (EOF or reset) before any byte of the answer (retryable on a reused
    /// connection); the kind it counts as when it is not retried.
    ClosedEarly(&'static str, String),
    Failed(&'static str, String),
}

/// The failure kind of an I/O error while waiting for or reading an answer.
fn io_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout",
        std::io::ErrorKind::UnexpectedEof => "short",
        _ => "reset",
    }
}

fn one_request(stream: &mut BufReader<TcpStream>) -> Outcome {
    if let Err(e) = stream
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    {
        return Outcome::ClosedEarly("reset", format!("write: {e}"));
    }
    let mut status = String::new();
    match stream.read_line(&mut status) {
        Ok(0) => return Outcome::ClosedEarly("short", "EOF before the answer".into()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Outcome::ClosedEarly("reset", format!("reset before the answer: {e}"));
        }
        Err(e) => return Outcome::Failed(io_kind(&e), format!("read status: {e}")),
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Outcome::Failed("bad_status", status);
    }
    let mut len = None;
    loop {
        let mut line = String::new();
        match stream.read_line(&mut line) {
            Ok(0) => return Outcome::Failed("short", "EOF in headers".into()),
            Ok(_) => {}
            Err(e) => return Outcome::Failed(io_kind(&e), format!("read headers: {e}")),
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let Some(len) = len else {
        return Outcome::Failed("short", "no Content-Length".into());
    };
    let mut body = vec![0; len];
    if let Err(e) = stream.read_exact(&mut body) {
        return Outcome::Failed(io_kind(&e), format!("body: {e}"));
    }
    Outcome::Ok(String::from_utf8_lossy(&body).into_owned())
}

impl Load {
    /// Starts `fresh` threads opening a new connection per request and `keepalive`
    /// threads reusing theirs. Each stops after `max_time` or `max_requests` requests.
    pub fn start(
        port: u16,
        fresh: usize,
        keepalive: usize,
        max_time: Duration,
        max_requests: u64,
    ) -> Load {
        let permit = crate::support::LOAD_GENERATORS.take();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let generations = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for i in 0..fresh + keepalive {
            let keep = i >= fresh;
            let (stop, counts, errors, generations) = (
                stop.clone(),
                counts.clone(),
                errors.clone(),
                generations.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + max_time;
                let mut conn: Option<BufReader<TcpStream>> = None;
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && sent < max_requests
                {
                    sent += 1;
                    let reused = conn.is_some();
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        let c = match conn.take() {
                            Some(c) => c,
                            None => match TcpStream::connect(("127.0.0.1", port)) {
                                Ok(s) => {
                                    let _ = s.set_read_timeout(Some(READ_TIMEOUT));
                                    BufReader::new(s)
                                }
                                Err(e) => {
                                    if io_kind(&e) == "timeout" {
                                        &counts.timed_out
                                    } else {
                                        &counts.connect_failed
                                    }
                                    .fetch_add(1, Ordering::Relaxed);
                                    push(&errors, format!("connect: {e}"));
                                    break;
                                }
                            },
                        };
                        let mut c = c;
                        match one_request(&mut c) {
                            Outcome::Ok(body) => {
                                counts.ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(g) = body
                                    .split_whitespace()
                                    .find_map(|w| w.strip_prefix("generation="))
                                {
                                    let mut gs = generations.lock().unwrap();
                                    if !gs.iter().any(|x| x == g) {
                                        gs.push(g.to_string());
                                    }
                                }
                                if keep {
                                    conn = Some(c);
                                }
                                break;
                            }
                            Outcome::ClosedEarly(_, _) if reused && attempt == 1 => {
                                counts.retried.fetch_add(1, Ordering::Relaxed);
                            }
                            Outcome::ClosedEarly(kind, e) | Outcome::Failed(kind, e) => {
                                match kind {
                                    "short" => &counts.short,
                                    "bad_status" => &counts.bad_status,
                                    "timeout" => &counts.timed_out,
                                    _ => &counts.reset,
                                }
                                .fetch_add(1, Ordering::Relaxed);
                                push(&errors, e);
                                break;
                            }
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            counts,
            errors,
            generations,
            threads,
            _permit: permit,
        }
    }

    pub fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests succeeded (deadline 30 s).
    pub fn wait_progress(&self, n: u64) {
        let target = self.ok() + n;
        crate::support::cluster::wait_for("load progress", Duration::from_secs(30), || {
            (self.ok() >= target).then_some(())
        });
    }

    /// Asserts that from now on only `generation` answers (after 20 more requests).
    pub fn expect_only_generation(&self, generation: u32) {
        self.reset_generations();
        self.wait_progress(20);
        assert_eq!(
            self.generations(),
            [generation.to_string()],
            "only generation {generation} answers"
        );
    }

    /// Clears the set of generations seen so far.
    pub fn reset_generations(&self) {
        self.generations.lock().unwrap().clear();
    }

    pub fn generations(&self) -> Vec<String> {
        self.generations.lock().unwrap().clone()
    }

    pub fn finish(self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let c = &self.counts;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let failed =
            g(&c.connect_failed) + g(&c.reset) + g(&c.short) + g(&c.bad_status) + g(&c.timed_out);
        Summary {
            ok: g(&c.ok),
            failed,
            connect_failed: g(&c.connect_failed),
            reset: g(&c.reset),
            short: g(&c.short),
            bad_status: g(&c.bad_status),
            timed_out: g(&c.timed_out),
            retried: g(&c.retried),
            errors: self.errors.lock().unwrap().clone(),
            generations: self.generations.lock().unwrap().clone(),
        }
    }
}

impl Summary {
    /// One line: requests, failures by kind, keep-alive retries.
    pub fn describe(&self) -> String {
        format!(
            "{} ok, {} failed (refused/connect {}, reset {}, EOF {}, timeout {}, bad status {}), {} keep-alive retries",
            self.ok,
            self.failed,
            self.connect_failed,
            self.reset,
            self.short,
            self.timed_out,
            self.bad_status,
            self.retried
        )
    }
}

fn push(errors: &Mutex<Vec<String>>, e: String) {
    let mut v = errors.lock().unwrap();
    if v.len() < 20 {
        v.push(e);
    }
}
