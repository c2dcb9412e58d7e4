"""Minimal WSGI app for the gunicorn peer benchmark: a fixed plain-text answer."""
import os

BODY = f"pid={os.getpid()} server=gunicorn\n".encode()


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
