#!/usr/bin/env python3
"""A tiny upstream for the keygate demo and tests: answers every request with
JSON describing what it received (method, path, headers), so you can see what
keygate passed on and what it stripped."""

import argparse
import json
import collections
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One buffered write per response, no Nagle: otherwise every keep-alive
    # response from Envoy's side waits ~40 ms on a delayed ACK.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    def _echo(self):
        hits = getattr(self.server, "hits", None)
        if hits is not None:
            with self.server.hits_lock:
                hits[self.headers.get("x-keygate-key-id", "")] += 1
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
            },
            indent=2,
        ).encode() + b"\n"
        self.send_response(200)
        # Tests ask for response headers an upstream of theirs would send:
        # `x-echo-set: name=value` (repeatable).
        for spec in self.headers.get_all("x-echo-set") or []:
            name, _, value = spec.partition("=")
            self.send_header(name.strip(), value.strip())
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, *args):
        pass


class EchoServer:
    """Runs the echo upstream in a background thread on 127.0.0.1."""

    def __init__(self, port=0):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), EchoHandler)
        self.httpd.daemon_threads = True
        # Requests received per x-keygate-key-id, to prove what reached the upstream.
        self.httpd.hits = self.hits = collections.Counter()
        self.httpd.hits_lock = threading.Lock()
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    httpd = ThreadingHTTPServer((args.host, args.port), EchoHandler)
    httpd.daemon_threads = True
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
