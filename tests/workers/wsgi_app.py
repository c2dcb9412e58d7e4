"""A minimal WSGI app for running gunicorn (Debian's package) as a clusterctl worker:
gunicorn takes the inherited socket itself (LISTEN_FDS, LISTEN_PID) and sends READY=1."""
import os


def app(environ, start_response):
    body = (
        f"worker={os.environ.get('WORKER_ID', '-')} pid={os.getpid()} "
        f"generation={os.environ.get('CLUSTER_GENERATION', '-')} server=gunicorn\n"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
