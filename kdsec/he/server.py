"""The HE host over HTTP: ``make_server`` (routes, bounds, one-line JSON errors) and the
``python -m kdsec.he.server`` entry point. See ``kdsec.he.host`` for the endpoints."""

from __future__ import annotations

import argparse
import json
import re
import ssl
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from kdsec.errors import KdsecError
from kdsec.he import he_ops
from kdsec.he.tokens import AuthError, Authenticator, TokenStore, budget_from_audit
from kdsec.he.host import (ANONYMOUS, ClientLimits, 
    CONTENT_LENGTH,
    IDLE_TIMEOUT,
    MAX_BODY,
    MAX_IN_FLIGHT,
    MAX_SESSION_BYTES,
    MAX_SESSIONS,
    MIB,
    MIN_UPLOAD_RATE,
    READ_TIMEOUT,
    SESSION_ID,
    HEHost,
    HostBusy,
    HostError,
    LengthRequired,
    NotFound,
    TooLarge,
    _one_line,
    log,
)


CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,10}")
MAX_TRAILERS = 32
MAX_CHUNKS = 1 << 16  # a 512 MiB body in 8 KiB chunks; tiny chunks would cost a Python loop each
AUTH_DRAIN = 1 << 20  # body bytes read from a client refused for its credential before closing


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM chain) and ``key``: TLS 1.2 or later, Python's defaults."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise KdsecError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None
    return context


def make_server(host: HEHost, port: int = 0, address: str = "127.0.0.1", read_timeout: float = READ_TIMEOUT,
                max_body: int = MAX_BODY, auth: Authenticator | None = None,
                tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    """The host on ``address:port``. With ``auth`` every route but ``/health`` and ``/plan`` needs a
    client token (``kdsec.he.tokens``), and each client gets its own share (``ClientLimits``);
    without it every client is one, ``anonymous``. With ``tls`` (``tls_context``) it speaks HTTPS
    only: each connection's handshake runs in its own thread, within ``read_timeout``."""

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive and pipelining (a connection's requests read in turn from its buffer); idle
        # connections close after ``read_timeout``; a refusal always closes.
        protocol_version = "HTTP/1.1"
        # socketserver sets this on the connection: a read or write stalled this long raises TimeoutError.
        timeout = read_timeout
        server_version = "kdsec-he"
        sys_version = ""

        def log_message(self, *args) -> None:  # request lines would go to stderr; keep the console quiet
            pass

        def _reply(self, status: int, body: bytes, content_type: str = "application/octet-stream",
                   headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
            self._reply(status, json.dumps(payload).encode(), "application/json", headers)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """Every error, the stdlib's own (bad request line, oversized headers) included: one line of JSON."""
            # An unparsable request line leaves the version at HTTP/0.9, which would send the body
            # without a status line; nobody speaks 0.9, so answer in 1.0.
            self.request_version = "HTTP/1.0" if self.request_version == "HTTP/0.9" else self.request_version
            self.close_connection = True
            self._json(code, {"error": _one_line(message or self.responses.get(code, ("error",))[0])})

        def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None,
                    drain_up_to: int | None = None) -> None:
            # Read what is left of a refused body first: closing on unread bytes resets the
            # connection, and the client would see that instead of this answer. Not for a client
            # without a credential beyond ``drain_up_to`` bytes: it gets the close.
            if drain_up_to is None and auth is not None and not self.authenticated:
                drain_up_to = AUTH_DRAIN  # a client without a valid credential: never a long drain
            length = self.headers.get("Content-Length", "") if self.headers else ""
            small = drain_up_to is None or (CONTENT_LENGTH.fullmatch(length.strip()) and int(length) <= drain_up_to)
            if not self.body_read and small:
                try:
                    self._read(self._length(), keep=False)
                except HostError:
                    pass  # no usable length: nothing to drain
            self.close_connection = True
            self._json(status, {"error": _one_line(message)}, headers)

        def do_GET(self) -> None:
            self._handle()

        do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = do_GET

        def _handle(self) -> None:
            # Any request that frames a body has one to read (or the connection closes after the
            # answer): bytes left unread would otherwise be parsed as the next request.
            self.body_read = ("Transfer-Encoding" not in self.headers
                              and self.headers.get("Content-Length", "0").strip() in ("0", ""))
            self.authenticated = auth is None
            try:
                try:
                    self._route()
                    if not self.body_read:
                        self.close_connection = True
                except AuthError as exc:
                    challenge = {"WWW-Authenticate": 'Bearer realm="kdsec-he"'} if exc.status == 401 else {}
                    self._refuse(exc.status, str(exc), challenge, drain_up_to=AUTH_DRAIN)
                except HostBusy as exc:  # 503 host-wide, 429 this client's share
                    self._refuse(exc.status, str(exc), {"Retry-After": str(exc.retry_after)})
                except HostError as exc:
                    self._refuse(exc.status, str(exc))
                except KdsecError as exc:  # ConfigError, IntegrityError: the request's bytes are at fault
                    self._refuse(400, str(exc))
                except TimeoutError:
                    self._refuse(408, "the request body stalled or arrived too slowly: resend it")
                except OSError:  # the client reset, or TLS broke, mid-request: nobody is left to answer
                    self.close_connection = True
                except Exception:
                    log.exception("HE host: unexpected error on %s %s", self.command, self.path[:200])
                    self._refuse(500, "internal error on the HE host (logged there)")
            except OSError:  # the client went away or stopped reading: nobody is left to answer
                self.close_connection = True

        def _route(self) -> None:
            url = urlparse(self.path)
            match url.path.strip("/").split("/"):
                case ["health"]:
                    methods = {"GET": lambda: self._json(200, {"status": "ok"})}
                case ["plan"]:  # with how clients authenticate, so that one without a token learns it first
                    methods = {"GET": lambda: self._json(200, {**host.plan, "auth": "none" if auth is None else "bearer"})}
                case ["whoami"]:  # a credential checked before a large upload (a refused body is not read)
                    methods = {"GET": lambda: self._json(200, {"client": self.client,
                                                               "host": None if auth is None else auth.host_id})}
                case ["sessions"]:
                    methods = {"POST": self._open}
                case ["sessions", session_id]:
                    methods = {"DELETE": lambda: self._close(session_id)}
                case ["infer", session_id]:
                    methods = {"POST": lambda: self._infer(session_id, parse_qs(url.query).get("path", ["batched"])[0])}
                case _:
                    raise NotFound("not found: the routes are GET /health, GET /plan, GET /whoami, POST /sessions, "
                                   "DELETE /sessions/<id>, POST /infer/<id>?path=batched|single")
            if self.command not in methods:
                return self._refuse(405, f"method {self.command} not allowed here (allowed: {', '.join(methods)})",
                                    {"Allow": ", ".join(methods)})
            # Health and the plan are public (a client plans its keys from it); the rest needs a token.
            self.client = ANONYMOUS if auth is None or url.path.strip("/") in ("health", "plan") else \
                auth.client(self.headers.get("Authorization"))
            self.authenticated = self.authenticated or self.client != ANONYMOUS
            methods[self.command]()

        def _open(self) -> None:
            with self._body() as body:
                session_id, memory_bytes = host.open_session(body, self.client)
            self._json(200, {"session": session_id, "memory_bytes": memory_bytes})

        def _close(self, session_id: str) -> None:
            host.close_session(self._session_id(session_id), self.client)
            self._json(200, {"closed": session_id})

        def _infer(self, session_id: str, path: str) -> None:
            if path not in ("batched", "single"):
                raise HostError(f"unknown path '{path[:40]}' (batched or single)")
            session_id = self._session_id(session_id)
            host.check_budget(session_id, path, self.client)  # before the upload, not after it
            with self._body() as body:
                reply = host.infer(session_id, path, body, self.client)
            self._reply(200, reply)

        @staticmethod
        def _session_id(session_id: str) -> str:
            if not SESSION_ID.fullmatch(session_id):
                raise NotFound(f"unknown session '{session_id[:40]}': open a new session (POST /sessions)")
            return session_id

        def _length(self) -> int | None:
            """The body's Content-Length, or None for a chunked body."""
            if "Transfer-Encoding" in self.headers:
                if "Content-Length" in self.headers:  # the framing a request-smuggling attack plays on
                    raise HostError("a body with both a Transfer-Encoding and a Content-Length is ambiguous: send one")
                codings = [coding.strip().lower() for value in self.headers.get_all("Transfer-Encoding")
                           for coding in value.split(",")]
                if codings != ["chunked"]:
                    raise HostError(f"Transfer-Encoding must be chunked alone, got '{', '.join(codings)[:60]}'")
                return None
            if len(self.headers.get_all("Content-Length") or []) > 1:
                raise HostError("more than one Content-Length header: send one")
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise LengthRequired("a Content-Length (or Transfer-Encoding: chunked) is required")
            if not CONTENT_LENGTH.fullmatch(raw.strip()):
                raise HostError(f"Content-Length must be a non-negative integer, got '{raw[:40]}'")
            length = int(raw)
            if length == 0:
                raise HostError("empty body: send a kdsec HE bundle")
            if length > max_body:
                raise TooLarge(f"body of {length} bytes is over the host's limit of {max_body} bytes")
            return length

        @contextmanager
        def _body(self) -> Iterator[bytes]:
            """The body, read and used within one of the host's work slots (``HEHost.work_slot``)."""
            length = self._length()
            with host.work_slot(self.client):
                yield self._read(length, keep=True)

        def _read(self, length: int | None, keep: bool) -> bytes:
            """The body (dropped unless ``keep``): ``length`` bytes, or chunked when None. Each read
            within the timeout, all of it at ``MIN_UPLOAD_RATE`` on average."""
            self.body_read = True  # even if it stalls: a refusal must not wait for it again
            started = time.monotonic()
            body = bytearray()
            try:
                if length is not None:
                    self._exact(length, body if keep else None, started, 0)
                else:
                    self._chunked(body if keep else None, started)
                return bytes(body)
            finally:
                self.connection.settimeout(self.timeout)

        def _wait(self, started: float, received: int) -> None:
            """Set the socket's timeout for the next read: after ``read_timeout`` of grace the client
            must have kept up ``MIN_UPLOAD_RATE`` over the ``received`` bytes so far."""
            remaining = started + self.timeout + received / MIN_UPLOAD_RATE - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.connection.settimeout(min(self.timeout, remaining))

        def _exact(self, length: int, into: bytearray | None, started: float, before: int) -> None:
            left = length
            while left:
                self._wait(started, before + length - left)
                chunk = self.rfile.read1(min(left, MIB))
                if not chunk:  # a client fault: 400 (sent if the client still reads), never a 500
                    raise HostError(f"the body ended after {length - left} of its {length} bytes "
                                    f"({'a chunk' if before or length != left else 'Content-Length'}): "
                                    "send the whole body")
                left -= len(chunk)
                if into is not None:
                    into += chunk

        def _line(self, limit: int, started: float, total: int, what: str) -> bytes:
            self._wait(started, total)
            raw = self.rfile.readline(limit + 2)
            if raw.endswith(b"\n") and not raw.endswith(b"\r\n"):
                raise HostError(f"a chunked body's {what} must end in CRLF")
            if not raw.endswith(b"\n"):
                if len(raw) <= limit:
                    raise HostError(f"the chunked body ended in its {what}")
                raise HostError("a chunk's data must be followed by CRLF" if what == "chunk end"
                                else f"a chunked body's {what} is over {limit} bytes")
            return raw[:-2]

        def _chunked(self, into: bytearray | None, started: float) -> None:
            """A chunked body (RFC 9112 §7.1): sizes in hex (extensions ignored), at most ``max_body``
            bytes and ``MAX_CHUNKS`` chunks in all, then at most ``MAX_TRAILERS`` trailer lines,
            which are dropped."""
            total = 0
            for _ in range(MAX_CHUNKS + 1):
                size = self._line(80, started, total, "chunk size").split(b";", 1)[0].strip()
                if not CHUNK_SIZE.fullmatch(size):
                    raise HostError(f"malformed chunk size '{size[:20].decode('latin-1')}' (hex digits)")
                if not (count := int(size, 16)):
                    break
                if total + count > max_body:
                    raise TooLarge(f"chunked body over the host's limit of {max_body} bytes")
                self._exact(count, into, started, total)
                total += count
                if self._line(0, started, total, "chunk end"):
                    raise HostError("a chunk's data must be followed by CRLF")
            else:
                raise HostError(f"a chunked body of over {MAX_CHUNKS} chunks: send larger chunks")
            for _ in range(MAX_TRAILERS):
                if not self._line(8192, started, total, "trailer"):
                    break
            else:
                raise HostError(f"a chunked body has over {MAX_TRAILERS} trailer lines")
            if not total:
                raise HostError("empty body: send a kdsec HE bundle")

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # the listen backlog: the stdlib's 5 drops bursts of concurrent clients

        def finish_request(self, request, client_address) -> None:  # in the connection's own thread
            if tls is None:
                return super().finish_request(request, client_address)
            request.settimeout(read_timeout)  # a client that stalls its handshake holds this thread only
            try:
                wrapped = tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):  # plain HTTP, a bad handshake, a timeout: nothing to answer
                return None
            try:
                super().finish_request(wrapped, client_address)
            finally:
                wrapped.close()

    return Server((address, port), Handler)


def main(argv: list[str] | None = None) -> None:
    from kdsec.compress import load_weights

    parser = argparse.ArgumentParser(description="Serve encrypted-input inference for a kdsec HE student.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a kdsec checkpoint (float or int8)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, help="sessions open at once")
    parser.add_argument("--max-session-mib", type=float, default=MAX_SESSION_BYTES / MIB,
                        help="estimated memory of all open sessions, MiB (a batched session of a small student "
                             "is ~15 MiB, a single-path one ~75, a conv student's diagonal single path ~730)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                        help="seconds after its last request before a session expires")
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                        help="requests read or evaluated at once; more get 503")
    parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                        help="seconds a socket read may stall before the request gets 408")
    parser.add_argument("--max-body-mib", type=float, default=MAX_BODY / MIB, help="largest request body, MiB")
    who = parser.add_argument_group("clients (kdsec he-token makes their tokens)")
    who.add_argument("--token-file", type=Path, help="the token store (hashes only); required unless --no-auth")
    who.add_argument("--host-id", default="he-host", help="this host's name: a token made for another is refused")
    who.add_argument("--no-auth", action="store_true", help="serve anyone, as one client (loopback tests only)")
    who.add_argument("--client-sessions", type=int, default=ClientLimits.sessions, help="sessions per client")
    who.add_argument("--client-session-mib", type=float, default=ClientLimits.session_bytes / MIB,
                     help="estimated session memory per client, MiB")
    who.add_argument("--client-in-flight", type=int, default=ClientLimits.in_flight, help="requests per client at once")
    who.add_argument("--audit", type=Path, help="the served model's audit.json: the query budget defaults to the "
                                                "queries its extraction audit measured (probabilities interface)")
    who.add_argument("--query-budget", type=int, help="samples answered per client per --budget-window (a batched "
                                                      "request counts its ring's slots); default: from --audit")
    who.add_argument("--budget-window", type=float, default=ClientLimits.window, help="seconds")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve HTTPS")
    tls.add_argument("--tls-key", type=Path, help="its PEM private key")
    args = parser.parse_args(argv)
    bounds = {"--max-sessions": args.max_sessions, "--max-session-mib": args.max_session_mib,
              "--idle-timeout": args.idle_timeout, "--max-in-flight": args.max_in_flight,
              "--read-timeout": args.read_timeout, "--max-body-mib": args.max_body_mib,
              "--client-sessions": args.client_sessions, "--client-session-mib": args.client_session_mib,
              "--client-in-flight": args.client_in_flight, "--budget-window": args.budget_window,
              **({"--query-budget": args.query_budget} if args.query_budget is not None else {})}
    try:
        for flag, value in bounds.items():
            if not value > 0:
                raise KdsecError(f"{flag} must be positive, got {value}")
        if args.no_auth and args.host not in ("127.0.0.1", "::1", "localhost"):
            raise KdsecError(f"--no-auth serves anyone: only on a loopback address, not {args.host}")
        if args.no_auth == bool(args.token_file):
            raise KdsecError("give --token-file (a store made by kdsec he-token create) or, for a loopback test, --no-auth")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise KdsecError("--tls-cert and --tls-key come together")
        budget = args.query_budget if args.query_budget is not None else \
            budget_from_audit(args.audit) if args.audit else None
        auth = None if args.no_auth else Authenticator(TokenStore(args.token_file), args.host_id)
        limits = ClientLimits(args.client_sessions, int(args.client_session_mib * MIB), args.client_in_flight,
                              budget, args.budget_window)
        if auth is None:  # every client is one: its share is the whole host (the budget still applies)
            limits = ClientLimits(args.max_sessions, int(args.max_session_mib * MIB), args.max_in_flight,
                                  budget, args.budget_window)
        host = HEHost(he_ops(load_weights(args.model)[0]), args.max_sessions, int(args.max_session_mib * MIB),
                      args.idle_timeout, args.max_in_flight, limits)
        server = make_server(host, args.port, args.host, args.read_timeout, int(args.max_body_mib * MIB), auth,
                             tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None)
    except (KdsecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    scheme = "https" if args.tls_cert else "http"
    print(f"kdsec HE host listening on {scheme}://{args.host}:{server.server_address[1]} "
          f"({'no authentication' if auth is None else f'host id {args.host_id}'}; query budget "
          f"{'none' if budget is None else f'{budget} samples per client per {args.budget_window:g} s'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
