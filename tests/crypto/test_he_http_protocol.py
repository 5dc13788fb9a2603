"""The HTTP edge cases that decide whether the stdlib server may stay (instead of uvicorn): keep-alive,
pipelining, slow senders and chunked bodies, each on a real socket."""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlparse

import pytest

from tests.crypto.test_he_http import _answer, _error, _serving


def _connect(url: str) -> socket.socket:
    parts = urlparse(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _responses(connection: socket.socket, count: int) -> list[tuple[int, dict, bytes]]:
    """``count`` HTTP responses read in turn from one connection."""
    reader = connection.makefile("rb")
    answers = []
    for _ in range(count):
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        answers.append((status, headers, reader.read(int(headers["content-length"]))))
    return answers


def _chunked(body: bytes, size: int) -> bytes:
    parts = [b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\nX-Trailer: ignored\r\n\r\n"


def test_one_connection_serves_request_after_request(ops):
    with _serving(ops) as (url, _):
        parts = urlparse(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        for _ in range(3):
            connection.request("GET", "/plan")
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Connection") != "close"
            json.loads(response.read())
        first = connection.sock
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status": "ok"}' and connection.sock is first
        connection.close()


def test_pipelined_requests_are_answered_in_order(ops, holder):
    context = holder.public_context()
    with _serving(ops) as (url, he_host), _connect(url) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                           + b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(context) + context
                           + b"GET /plan HTTP/1.1\r\nHost: x\r\n\r\n")
        (health, _, first), (opened, _, session), (planned, _, plan) = _responses(connection, 3)
        assert (health, opened, planned) == (200, 200, 200)
        assert json.loads(first) == {"status": "ok"} and json.loads(session)["session"] in he_host.sessions
        assert "structure" in json.loads(plan)


def test_a_chunked_context_opens_a_session_and_bad_chunking_is_one_line(ops, holder):
    context = holder.public_context()
    with _serving(ops) as (url, he_host):
        with _connect(url) as connection:
            connection.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + _chunked(context, 65_000) + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            (status, _, body), (after, _, _) = _responses(connection, 2)  # and the connection stays usable
        assert status == 200 and json.loads(body)["session"] in he_host.sessions and after == 200
        for name, chunked, message in [
            ("a size line without end", b"1" * 200, "chunk size is over 80 bytes"),
            ("cut in a chunk", b"10\r\nabc", "ended after 3 of its 16 bytes"),
            ("too many trailers", b"1\r\nx\r\n0\r\n" + b"T: x\r\n" * 40 + b"\r\n", "over 32 trailer lines"),
            ("size over the limit", b"fffffffff\r\n", "over the host's limit"),
        ]:
            with _connect(url) as connection:
                connection.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
                connection.shutdown(socket.SHUT_WR)
                head, _, body = _answer(connection, wait=10).partition(b"\r\n\r\n")
            assert head.split()[1] in (b"400", b"413"), (name, head)
            assert message in _error(int(head.split()[1]), body), name


def test_a_chunked_sender_that_trickles_gets_408(ops):
    with _serving(ops, read_timeout=1.0) as (url, _), _connect(url) as connection:
        started = time.monotonic()
        connection.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab")
        answer = _answer(connection, wait=10)
        assert answer.startswith(b"HTTP/1.1 408") and 0.9 < time.monotonic() - started < 8


def test_an_idle_kept_alive_connection_is_closed_after_the_read_timeout(ops):
    with _serving(ops, read_timeout=1.0) as (url, _), _connect(url) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _responses(connection, 1)[0][0] == 200
        started = time.monotonic()
        connection.settimeout(10)
        assert connection.recv(1) == b""  # the host closed it
        assert 0.9 < time.monotonic() - started < 8


@pytest.mark.parametrize("version", [b"HTTP/1.0"])
def test_an_http_1_0_client_gets_its_close(ops, version):
    with _serving(ops) as (url, _), _connect(url) as connection:
        connection.sendall(b"GET /health " + version + b"\r\n\r\n")
        answer = _answer(connection, wait=10)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status": "ok"}')


def test_framing_that_could_smuggle_a_request_is_refused_or_closed(ops):
    with _serving(ops) as (url, _):
        # A GET with a body: answered, then closed (the body is never read as a next request).
        with _connect(url) as connection:
            smuggled = b"GET /plan HTTP/1.1\r\nHost: x\r\n\r\n"
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                               + smuggled)
            answer = _answer(connection, wait=10)
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 200")
        for name, request, message in [
            ("two lengths", b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
             "more than one Content-Length"),
            ("bare LF", b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
             "must end in CRLF"),
            ("65,537 chunks", b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"1\r\nx\r\n" * 65_537 + b"0\r\n\r\n", "over 65536 chunks"),
        ]:
            with _connect(url) as connection:
                connection.sendall(request)
                head, _, body = _answer(connection, wait=30).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), (name, head)
            assert message in _error(400, body), name


def test_the_client_never_follows_a_redirect_with_its_token():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kdsec.errors import KdsecError
    from kdsec.he.client import HEHttpClient

    seen = []

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(KdsecError, match=r"GET /plan \(302\)"):
            HEHttpClient(f"http://127.0.0.1:{server.server_address[1]}", token="kdsec-he_" + "0" * 12 + "_" + "A" * 43)
        assert len(seen) == 1  # /plan only: the Location was not followed
    finally:
        server.shutdown()
        server.server_close()
