# The WSGI app gunicorn serves in tests/servers.rs: names the answering process and its
# generation (clusterctl's CLUSTER_GENERATION), so the test can count workers and follow reloads.
import os


def app(environ, start_response):
    body = (
        f"pid={os.getpid()} generation={os.environ.get('CLUSTER_GENERATION')} "
        f"worker={os.environ.get('WORKER_ID')} server=gunicorn\n"
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]
