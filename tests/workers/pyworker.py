#!/usr/bin/env python3
"""A clusterctl worker in another language, using only the protocols (no libraries):
takes its listening socket from LISTEN_FDS (checking LISTEN_PID), reports READY=1 to
NOTIFY_SOCKET, answers HTTP/1.1 (keep-alive) with its WORKER_ID, pid and generation, and
drains on SIGTERM: stops accepting, finishes in-flight requests, closes keep-alive
connections. GET /argv answers its arguments as JSON (for exact-quoting tests).

PYWORKER_ALLOC_MB=N with PYWORKER_ALLOC_ONCE=PATH (for --max-worker-memory tests): the
first worker to create PATH (exclusively) holds N MiB of touched memory; the others, and
its replacement, do not."""
import http.server
import json
import os
import signal
import socket
import sys
import threading

draining = threading.Event()


def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), path)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 1.0  # idle keep-alive connections notice a drain within a second

    def do_GET(self):
        if self.path == "/argv":
            body = json.dumps(sys.argv[1:]).encode()
        else:
            body = (
                f"worker={os.environ.get('WORKER_ID', '-')} pid={os.getpid()} "
                f"generation={os.environ.get('CLUSTER_GENERATION', '-')} lang=python\n"
            ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (TimeoutError, socket.timeout):
            self.close_connection = True
        if draining.is_set():
            self.close_connection = True

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True


def alloc_once():
    mb = int(os.environ.get("PYWORKER_ALLOC_MB", "0"))
    once = os.environ.get("PYWORKER_ALLOC_ONCE")
    if mb <= 0 or not once:
        return None
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    print(f"pyworker {os.environ.get('WORKER_ID')} pid {os.getpid()} holds {mb} MiB", flush=True)
    return bytearray(b"x" * (mb << 20))  # written, so resident


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("pyworker: no sockets passed (LISTEN_FDS/LISTEN_PID)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=3)
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()

    def stop(signum, frame):
        draining.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    hog = alloc_once()
    print(f"pyworker {os.environ.get('WORKER_ID')} pid {os.getpid()} ready", flush=True)
    notify("READY=1\nSTATUS=python worker serving")
    server.serve_forever(poll_interval=0.2)
    del hog
    # Stop accepting (do not shutdown() the shared socket), then wait for in-flight requests.
    server.server_close()
    print(f"pyworker {os.environ.get('WORKER_ID')} pid {os.getpid()} drained", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
