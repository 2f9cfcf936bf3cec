"""The only door the devices see: a TLS reverse proxy that forwards Flower's Fleet API (and ``/health``) to a
SuperLink listening on 127.0.0.1, and refuses everything else — in Flower 1.41 one SuperLink port serves the Fleet,
Control (register keys, submit runs: code execution) and Runtime APIs and ``/docs`` alike (shared/DEPLOY.md,
"Security holes"). Requests and replies pass byte for byte (the node-auth headers sign only a timestamp, so a
terminating proxy breaks nothing); an unreachable upstream answers 502/504, which SuperNodes retry."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("fedlora.proxy")

FLEET_PATHS = frozenset(f"/v1/fleet/{p}" for p in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                        "proxy-authorization", "proxy-authenticate", "host", "content-length"})
MAX_BODY = 64 * 2**20


def _handler(upstream_port: int, upstream_ctx: ssl.SSLContext, timeout_s: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fedlora-fleet-proxy"

        def log_message(self, fmt, *args):  # never log request headers (they carry replayable signatures)
            log.debug("%s %s", self.address_string(), fmt % args)

        def _refuse(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _forward(self, body: bytes | None) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPSConnection("127.0.0.1", upstream_port, context=upstream_ctx, timeout=timeout_s)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
            except (socket.timeout, TimeoutError):
                return self._refuse(504)
            except (OSError, http.client.HTTPException):
                return self._refuse(502)
            finally:
                conn.close()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            if self.path not in FLEET_PATHS:
                return self._refuse(404)
            n = int(self.headers.get("Content-Length", "0") or 0)
            if n > MAX_BODY:
                return self._refuse(413)
            self._forward(self.rfile.read(n))

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/health":
                return self._refuse(404)
            self._forward(None)

        do_HEAD = do_GET

        def _not_here(self) -> None:
            self._refuse(404)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_here

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a refused TLS handshake is not a traceback
        import sys

        log.info("connection from %s failed: %s", client_address[0], sys.exc_info()[1])


class FleetProxy:
    """Listen on ``host:port`` with TLS (``cert``/``key``), forward the Fleet API to ``127.0.0.1:upstream_port``
    (verified against ``ca``). ``start()`` serves from a thread; ``stop()`` ends it."""

    def __init__(self, host: str, port: int, upstream_port: int, *, cert: str, key: str, ca: str,
                 timeout_s: float = 60.0) -> None:
        upstream = ssl.create_default_context(cafile=ca)
        self.server = _Server((host, port), _handler(upstream_port, upstream, timeout_s))
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        # the handshake happens in the request's thread, so a slow client cannot stall the accept loop
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> FleetProxy:
        self._thread = threading.Thread(target=self.server.serve_forever, name="fedlora-fleet-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
