//! The control socket's clients, for the executor: accept without blocking, collect a
//! request line (with a deadline), turn it into an `Event` with a `Ticket`, and write the
//! state machine's answer (`Action::Answer`, `ReloadFinished`, `Report`) back to the
//! client holding that ticket.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::Executor;
use super::event::{Event, Ticket};
use crate::control::Request;

impl Executor {
    /// Accepts new control clients and serves those whose request line is complete;
    /// clients past their deadline get an error answer. Never blocks on a client.
    pub(super) fn serve_control(&mut self, accept: bool, events: &mut Vec<Event>) {
        if accept {
            for (stream, r) in self.accept_clients() {
                match r {
                    Ok(request) => self.handle_request(stream, request, events),
                    Err(e) => self.reply(stream, Err(e)),
                }
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.clients.len() {
            let done = match self.clients[i].read_request() {
                Some(r) => Some(r),
                None if self.clients[i].deadline <= now => Some(Err(format!(
                    "no complete request within {:?}",
                    crate::control::REQUEST_TIMEOUT
                ))),
                None => None,
            };
            match done {
                Some(r) => {
                    let stream = self.clients.swap_remove(i).into_stream();
                    match r {
                        Ok(request) => self.handle_request(stream, request, events),
                        Err(e) => self.reply(stream, Err(e)),
                    }
                }
                None => i += 1,
            }
        }
    }

    /// Accepts every waiting client; returns those whose request had already arrived (most
    /// clients send it right after connecting), to be served at once. At most
    /// `max_clients` stay pending: the oldest (silent) one is closed to make room. Out of
    /// fds (EMFILE), the oldest pending client is closed and accept retried; with none to
    /// close, the listener is not polled for a moment: never a busy loop.
    pub(super) fn accept_clients(&mut self) -> Vec<(UnixStream, Result<Request, String>)> {
        const PAUSE: Duration = Duration::from_millis(250);
        let mut ready = Vec::new();
        let Some(control) = &self.control else {
            return ready;
        };
        // Bounded per wake-up, so that a client flood cannot keep the loop here.
        for _ in 0..1024 {
            match control.accept() {
                Ok(None) => break,
                Ok(Some(mut c)) => {
                    if let Some(r) = c.read_request() {
                        ready.push((c.into_stream(), r));
                    } else {
                        if self.clients.len() >= self.max_clients {
                            self.clients.remove(0);
                        }
                        self.clients.push(c);
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EMFILE | nix::libc::ENFILE)
                    ) && !self.clients.is_empty() =>
                {
                    self.clients.remove(0);
                }
                Err(e) => {
                    self.complaints.complain(format_args!(
                        "control socket: cannot accept a client ({e}); pausing for {PAUSE:?}"
                    ));
                    self.accept_paused = Some(Instant::now() + PAUSE);
                    break;
                }
            }
        }
        ready
    }

    /// Answers a control client (without blocking; see `control::answer`).
    pub(super) fn reply(&mut self, stream: UnixStream, result: Result<String, String>) {
        if let Some(o) = crate::control::answer(stream, result) {
            if self.outgoing.len() >= self.max_clients {
                self.outgoing.remove(0);
            }
            self.outgoing.push(o);
        }
    }

    pub(super) fn handle_request(
        &mut self,
        stream: UnixStream,
        request: Request,
        events: &mut Vec<Event>,
    ) {
        match request {
            Request::Status { json } => {
                let ticket = Some(self.ticket_for(stream));
                events.push(Event::Status { ticket, json });
            }
            // The client gets the state machine's own answer (`Action::Answer` or
            // `ReloadFinished`), never one guessed before the transition ran.
            Request::Scale(n) => {
                let ticket = self.ticket_for(stream);
                events.push(Event::Scale {
                    workers: n,
                    ticket: Some(ticket),
                });
            }
            Request::Reload { rolling, wait } => {
                let ticket = Some(self.ticket_for(stream));
                events.push(if rolling {
                    Event::RollingRestart { ticket, wait }
                } else {
                    Event::Reload { ticket, wait }
                });
            }
            Request::Upgrade { wait, binary } => {
                let ticket = self.ticket_for(stream);
                events.push(Event::Upgrade {
                    ticket,
                    wait,
                    binary,
                });
            }
        }
    }

    /// Answers the control client holding `ticket` (gone already: nothing to do).
    pub(super) fn answer(&mut self, ticket: Ticket, result: Result<String, String>) {
        if let Some(i) = self.waiting.iter().position(|(w, _)| *w == ticket) {
            let (_, stream) = self.waiting.swap_remove(i);
            self.reply(stream, result);
        }
    }

    /// Keeps a control client until the state machine answers it.
    pub(super) fn ticket_for(&mut self, stream: UnixStream) -> Ticket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push((ticket, stream));
        ticket
    }

    /// The status snapshot for `clusterctl status` and SIGUSR1.
    pub(super) fn report(&self) -> super::status::Report {
        let sockets = self
            .listeners
            .names
            .iter()
            .cloned()
            .zip(self.listeners.addresses.iter().cloned())
            .collect();
        super::status::report(&self.state, sockets, self.started, Instant::now())
    }

    /// Answers a status request (`ticket`), or logs the report (SIGUSR1).
    pub(super) fn report_status(&mut self, ticket: Option<Ticket>, json: bool) {
        let report = self.report();
        match ticket {
            Some(ticket) => {
                let text = if json {
                    report.json()
                } else {
                    format!("\n{}", report.text())
                };
                self.answer(ticket, Ok(text));
            }
            None => {
                for line in report.text().lines() {
                    tracing::info!("stats: {line}");
                }
            }
        }
    }
}
