"""Encrypted-input inference over HTTP: a host that holds the plaintext model and only public
contexts, and the client (key holder) that talks to it.

Endpoints (bodies are kdsec HE bundles, see ``kdsec.crypto.seal.pack``)::

    GET    /plan                 layer shapes, depth and rotation steps per path (no weights)
    POST   /sessions             body: a public context → {"session": id, "memory_bytes": estimate}
    DELETE /sessions/<id>        close a session and free its keys
    POST   /infer/<id>?path=P    body: ciphertexts → ciphertexts (P: batched | single)

Every error is one line of JSON, ``{"error": "..."}``: 400 malformed input (bad bundle, wrong
parameters, wrong count), 404 unknown route or session, 405 wrong method, 408 body too slow,
410 session expired or closed (open a new one), 411/413 missing or oversized body, 503 host full
or busy (with Retry-After), 500 anything unexpected (logged on the host, never sent).

The host never receives, stores or could use a secret key: ``PublicContext.deserialize``
accepts exactly a public key, relinearization keys and the declared rotation keys.

Bounds: open sessions (count and estimated bytes, ``HEParams.resident_bytes``), idle expiry,
requests in flight, body size, and a read timeout per socket read plus a minimum upload rate.
We keep the stdlib ``ThreadingHTTPServer`` (no new dependency): with these bounds a thread per
connection is cheap next to one CKKS evaluation, and SEAL holds the GIL, so an async server would
not evaluate more at once. Connections themselves are not counted: one waiting for its headers
holds a thread (never a work slot) until ``read_timeout`` passes between bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from kdsec.config import HEConfig
from kdsec.crypto.he import (BatchedServer, DiagonalPlan, DiagonalServer, GatherPlan, GatherServer, GridPlan,
                             SingleServer, model_structure, he_ops, single_plan)
from kdsec.crypto.he.gather import GATHER_INPUT_BITS, GATHER_WEIGHT_SCALE_BITS
from kdsec.crypto.he.program import alternates, batched_params
from kdsec.crypto.seal import HEParams, KeyHolder, PublicContext, plan_paired, plan_params
from kdsec.errors import KdsecError

MIB = 1 << 20
MAX_BODY = 512 * MIB
# Defaults of the bounds (HEHost, make_server and the CLI flags).
MAX_SESSIONS = 32
MAX_SESSION_BYTES = 2048 * MIB  # ~130 batched or ~25 single-path sessions of a small student
IDLE_TIMEOUT = 600.0
MAX_IN_FLIGHT = 4  # SEAL holds the GIL: more slots add memory, not throughput
READ_TIMEOUT = 30.0
MIN_UPLOAD_RATE = 256 * 1024  # bytes/s on average: a trickling client holds a slot ≤ timeout + size/rate
REMEMBERED_CLOSED = 4096  # ids of ended sessions kept to answer 410 instead of 404
SESSION_ID = re.compile(r"[0-9a-f]{16}")
CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
log = logging.getLogger(__name__)


class HostError(KdsecError):
    """A request the host refuses; ``status`` is the HTTP answer."""

    status = 400


class NotFound(HostError):
    status = 404


class SessionGone(HostError):
    status = 410


class LengthRequired(HostError):
    status = 411


class TooLarge(HostError):
    status = 413


class HostBusy(HostError):
    status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Session:
    servers: dict[str, BatchedServer | SingleServer | DiagonalServer]
    memory_bytes: int
    last_used: float
    users: int = 0  # requests holding it now: a session in use never expires
    # One evaluation at a time: the evaluator's PublicContext.counts is mutated during evaluation.
    lock: threading.Lock = field(default_factory=threading.Lock)


class HEHost:
    """The model, its plan and the open sessions, within the given bounds."""

    def __init__(self, ops, max_sessions: int = MAX_SESSIONS, max_session_bytes: int = MAX_SESSION_BYTES,
                 idle_timeout: float = IDLE_TIMEOUT, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.ops = ops
        # The single-sample layout as the pipeline chooses it: the grid where it fits the largest
        # secure ring, else the gather layout (conv students alternating Linear and x²), else diagonals.
        single = self._single_layout = single_plan(ops, HEConfig())
        self._single = {GridPlan: SingleServer, GatherPlan: lambda public, ops: GatherServer(public, ops, single),
                        DiagonalPlan: DiagonalServer}[type(single)]
        # Gather and diagonal sessions hold their encoded weights: counted with the session's keys.
        self._single_plaintext_bytes = {GridPlan: None, GatherPlan: GatherServer.encoded_bytes,
                                        DiagonalPlan: DiagonalServer.encoded_bytes}[type(single)]
        self._single_chain = (f"the paired chain at weight_scale_bits {GATHER_WEIGHT_SCALE_BITS} on exactly "
                              f"{single.ring_slots} slots" if isinstance(single, GatherPlan)
                              else "no last_scale_bits or weight_scale_bits")
        layout = ({"layout": "grid", "rows": single.rows, "cols": single.cols} if isinstance(single, GridPlan)
                  else single.as_dict() | {"ciphertexts": single.ciphertexts} if isinstance(single, GatherPlan)
                  else {"layout": "diagonal"})
        # Structure, depths and layouts only: nothing here reveals a weight. The batched path's
        # parameters follow from the structure (``batched_params``: paired where it alternates).
        self.plan = {"structure": model_structure(ops),
                     "batched": {"depth": BatchedServer.depth(ops), "min_slots": 1, "rotation_steps": [],
                                 # the chains this host evaluates (a client plans paired only if listed)
                                 "chains": ["classic", "paired"] if alternates(model_structure(ops)) else ["classic"],
                                 "required_inputs": BatchedServer.required_inputs(ops)},
                     "single": {"depth": single.depth(ops), "min_slots": single.slots,
                                "rotation_steps": list(single.steps),
                                "output_slots": single.output_slots(ops).tolist(), **layout}}
        self.max_sessions, self.max_session_bytes, self.idle_timeout = max_sessions, max_session_bytes, idle_timeout
        self._residue_layers: dict = {}  # the batched servers' residue layers, one copy for every session
        self.in_flight = threading.BoundedSemaphore(max_in_flight)
        self.sessions: dict[str, _Session] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()  # session id → why it ended
        self.pending_sessions = self.pending_bytes = 0  # admitted, still being deserialized
        self.lock = threading.Lock()

    @property
    def session_bytes(self) -> int:
        return sum(session.memory_bytes for session in self.sessions.values())

    def _end(self, session_id: str, why: str) -> None:
        """Under ``self.lock``."""
        del self.sessions[session_id]
        self.ended[session_id] = why
        while len(self.ended) > REMEMBERED_CLOSED:
            self.ended.popitem(last=False)

    def expire(self) -> None:
        """Drop sessions idle longer than ``idle_timeout``."""
        now = time.monotonic()
        with self.lock:
            for session_id, session in list(self.sessions.items()):
                if not session.users and now - session.last_used > self.idle_timeout:
                    self._end(session_id, f"expired after {self.idle_timeout:g} s idle")

    def _admit(self, needed: int) -> None:
        """Reserve room for a session of ``needed`` bytes, or say when to retry. Under ``self.lock``."""
        if needed > self.max_session_bytes:
            raise HostError(f"this context needs ~{needed / MIB:.0f} MiB, over the host's whole session budget "
                            f"of {self.max_session_bytes / MIB:.0f} MiB: use smaller parameters")
        count = len(self.sessions) + self.pending_sessions
        used = self.session_bytes + self.pending_bytes
        if count < self.max_sessions and used + needed <= self.max_session_bytes:
            self.pending_sessions, self.pending_bytes = self.pending_sessions + 1, self.pending_bytes + needed
            return
        now = time.monotonic()
        idle = [session.last_used + self.idle_timeout - now for session in self.sessions.values() if not session.users]
        retry = max(1, math.ceil(min(idle))) if idle else max(1, math.ceil(self.idle_timeout))
        what = (f"{count} of {self.max_sessions} sessions open" if count >= self.max_sessions else
                f"{used / MIB:.0f} of {self.max_session_bytes / MIB:.0f} MiB of sessions held, "
                f"this one needs {needed / MIB:.0f}")
        raise HostBusy(f"host full ({what}): retry later or close an unused session", retry)

    def open_session(self, body: bytes) -> tuple[str, int]:
        """A new session for a public context: its id and estimated memory."""
        params, rotation_keys, steps = PublicContext.declared(body)
        paths = [path for path in ("batched", "single") if self._fits(params, steps, path)]
        if not paths:
            raise HostError(f"this context allows depth {params.program_depth} with {params.slots} slots; the model "
                            f"needs depth {self.plan['batched']['depth']} (batched) or depth "
                            f"{self.plan['single']['depth']}, {self.plan['single']['min_slots']} slots, the plan's "
                            f"rotation steps and {self._single_chain} (single)")
        needed = params.resident_bytes(rotation_keys)
        if "single" in paths and self._single_plaintext_bytes:
            needed += self._single_plaintext_bytes(self.ops, params)
        self.expire()
        with self.lock:
            self._admit(needed)
        try:
            public = PublicContext.deserialize(body)
            servers = {path: (BatchedServer(public, self.ops, self._residue_layers) if path == "batched"
                              else self._single(public, self.ops)) for path in paths}
            session_id = secrets.token_hex(8)
            with self.lock:
                self.sessions[session_id] = _Session(servers, needed, time.monotonic())
        finally:
            with self.lock:
                self.pending_sessions, self.pending_bytes = self.pending_sessions - 1, self.pending_bytes - needed
        return session_id, needed

    def _fits(self, params: HEParams, steps: tuple[int, ...], path: str) -> bool:
        """Whether a context of ``params`` and rotation ``steps`` (as declared) can run ``path``."""
        plan = self.plan[path]
        # only the batched server evaluates a last Linear without its rescale (last_scale_bits) or a
        # paired chain (weight_scale_bits)
        if path == "batched":  # a paired chain (weight_scale_bits) only for a program that alternates Linear and x²
            paired_ok = params.weight_scale_bits is None or alternates(self.plan["structure"])
            depth = params.program_depth if paired_ok else -1
        elif isinstance(self._single_layout, GatherPlan):  # its paired chain, on the ring it is laid out for
            gather = params.weight_scale_bits == GATHER_WEIGHT_SCALE_BITS and params.slots == plan["ring_slots"]
            depth = params.program_depth if gather else -1
        else:
            depth = params.depth if params.last_scale_bits is None and params.weight_scale_bits is None else -1
        return (depth >= plan["depth"] and params.slots >= plan["min_slots"]
                and set(plan["rotation_steps"]) <= set(steps))

    def close_session(self, session_id: str) -> None:
        with self.lock:
            if session_id in self.sessions:
                self._end(session_id, "closed")
            elif session_id not in self.ended:
                raise NotFound(f"unknown session '{session_id}'")

    def _use(self, session_id: str) -> _Session:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                if session_id in self.ended:
                    raise SessionGone(f"session '{session_id}' {self.ended[session_id]}: open a new session "
                                      "(POST /sessions)")
                raise NotFound(f"unknown session '{session_id}': open a new session (POST /sessions)")
            session.users += 1
            return session

    def infer(self, session_id: str, path: str, body: bytes) -> bytes:
        self.expire()
        session = self._use(session_id)
        try:
            server = session.servers.get(path)
            if server is None:
                extra = f", {self._single_chain}" if path == "single" else ""
                raise HostError(f"this session's context does not fit the {path} path (needs depth "
                                f"{self.plan[path]['depth']}, {self.plan[path]['min_slots']} slots{extra})")
            expected = (len(self.plan["batched"]["required_inputs"]) if path == "batched"
                        else self.plan["single"].get("ciphertexts", 1))
            with session.lock:
                public = server.public
                ciphertexts = public.load_ciphertexts(body, expected)
                fresh = public.context.first_parms_id()
                if any(ct.size() != 2 or ct.parms_id() != fresh or ct.scale != public.params.scale
                       for ct in ciphertexts):
                    raise HostError("send freshly encrypted ciphertexts: two parts, top level, scale 2^scale_bits")
                try:
                    outputs = server.infer(ciphertexts)
                except (ValueError, RuntimeError) as exc:  # SEAL refusing what this client's parameters ask
                    reason = _one_line(str(exc))[:200]
                    raise HostError(f"these parameters cannot evaluate the model: {reason}") from None
                return public.dump_ciphertexts(outputs)
        finally:
            with self.lock:
                session.users -= 1
                session.last_used = time.monotonic()


def _one_line(message: str) -> str:
    return " ".join(message.split())[:500]


def make_server(host: HEHost, port: int = 0, address: str = "127.0.0.1", read_timeout: float = READ_TIMEOUT,
                max_body: int = MAX_BODY) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
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

        def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            # Read what is left of a refused body first: closing on unread bytes resets the
            # connection, and the client would see that instead of this answer.
            if not self.body_read:
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
            self.body_read = self.command not in ("POST", "PUT", "PATCH", "DELETE")
            try:
                try:
                    self._route()
                except HostBusy as exc:
                    self._refuse(exc.status, str(exc), {"Retry-After": str(exc.retry_after)})
                except HostError as exc:
                    self._refuse(exc.status, str(exc))
                except KdsecError as exc:  # ConfigError, IntegrityError: the request's bytes are at fault
                    self._refuse(400, str(exc))
                except TimeoutError:
                    self._refuse(408, "the request body stalled or arrived too slowly: resend it")
                except Exception:
                    log.exception("HE host: unexpected error on %s %s", self.command, self.path[:200])
                    self._refuse(500, "internal error on the HE host (logged there)")
            except OSError:  # the client went away or stopped reading: nobody is left to answer
                self.close_connection = True

        def _route(self) -> None:
            url = urlparse(self.path)
            match url.path.strip("/").split("/"):
                case ["plan"]:
                    methods = {"GET": lambda: self._json(200, host.plan)}
                case ["sessions"]:
                    methods = {"POST": self._open}
                case ["sessions", session_id]:
                    methods = {"DELETE": lambda: self._close(session_id)}
                case ["infer", session_id]:
                    methods = {"POST": lambda: self._infer(session_id, parse_qs(url.query).get("path", ["batched"])[0])}
                case _:
                    raise NotFound("not found: the routes are GET /plan, POST /sessions, "
                                   "DELETE /sessions/<id>, POST /infer/<id>?path=batched|single")
            if self.command not in methods:
                return self._refuse(405, f"method {self.command} not allowed here (allowed: {', '.join(methods)})",
                                    {"Allow": ", ".join(methods)})
            methods[self.command]()

        def _open(self) -> None:
            with self._body() as body:
                session_id, memory_bytes = host.open_session(body)
            self._json(200, {"session": session_id, "memory_bytes": memory_bytes})

        def _close(self, session_id: str) -> None:
            host.close_session(self._session_id(session_id))
            self._json(200, {"closed": session_id})

        def _infer(self, session_id: str, path: str) -> None:
            if path not in ("batched", "single"):
                raise HostError(f"unknown path '{path[:40]}' (batched or single)")
            session_id = self._session_id(session_id)
            with self._body() as body:
                reply = host.infer(session_id, path, body)
            self._reply(200, reply)

        @staticmethod
        def _session_id(session_id: str) -> str:
            if not SESSION_ID.fullmatch(session_id):
                raise NotFound(f"unknown session '{session_id[:40]}': open a new session (POST /sessions)")
            return session_id

        def _length(self) -> int:
            if "Transfer-Encoding" in self.headers:
                raise LengthRequired("send the body with a Content-Length, not a Transfer-Encoding")
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise LengthRequired("a Content-Length is required")
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
            """The body, read and used within one of ``max_in_flight`` work slots (none free: 503)."""
            length = self._length()
            if not host.in_flight.acquire(blocking=False):
                raise HostBusy("host busy: every request slot is in use; retry shortly", 1)
            try:
                yield self._read(length, keep=True)
            finally:
                host.in_flight.release()

        def _read(self, length: int, keep: bool) -> bytes:
            """``length`` body bytes (dropped unless ``keep``), each read within the timeout and all of
            them at ``MIN_UPLOAD_RATE`` on average."""
            self.body_read = True  # even if it stalls: a refusal must not wait for it again
            deadline = time.monotonic() + self.timeout + length / MIN_UPLOAD_RATE
            chunks, left = [], length
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(min(self.timeout, remaining))
                chunk = self.rfile.read1(min(left, MIB))
                if not chunk:
                    raise ConnectionError("the client closed the connection mid-body")
                left -= len(chunk)
                if keep:
                    chunks.append(chunk)
            self.connection.settimeout(self.timeout)
            return b"".join(chunks)

    class Server(ThreadingHTTPServer):
        request_queue_size = 64  # the listen backlog: the stdlib's 5 drops bursts of concurrent clients

    return Server((address, port), Handler)


class HEHttpClient:
    """The key holder's side: fetch the plan, send a public context, encrypt, post, decrypt.

    Thread-safe: a lock serializes its calls (the host evaluates one request per session at a
    time anyway). For parallel inference give each thread its own client, hence its own keys
    and session::

        def worker(batch):
            with HEHttpClient(url) as client:
                return client.predict_logits(batch)

    ``close()`` (or leaving the ``with`` block) ends the host's session and frees its memory. A
    503 (host busy or full) is retried after its Retry-After while that fits in ``busy_wait`` seconds.
    """

    def __init__(self, url: str, config: HEConfig = HEConfig(), path: str = "batched",
                 busy_wait: float = 30.0) -> None:
        self.url, self.path, self.busy_wait = url.rstrip("/"), path, busy_wait
        self._lock = threading.Lock()
        self.plan = json.loads(self._request("GET", "/plan"))
        step = self.plan[path]
        if "paired" not in step.get("chains", ["classic"]):  # an older host, or a program that does not alternate
            config = config.model_copy(update={"batched_chain": "classic"})
        if path == "batched":
            params = batched_params(self.plan["structure"], config)
        elif step.get("layout") == "gather":  # its paired chain, on the ring the host laid it out for
            ring = GatherPlan.from_dict(step, self.plan["structure"][0][2]).ring_slots * 2  # checked first
            params = plan_paired(len(self.plan["structure"]) // 2, GATHER_WEIGHT_SCALE_BITS, config.integer_bits,
                                 ring, GATHER_INPUT_BITS)
            if params is None:
                raise KdsecError(f"no paired chain fits the host's gather layout on {step['ring_slots']} slots")
        else:
            params = plan_params(step["depth"], config.scale_bits, config.integer_bits, config.poly_modulus_degree,
                                 step["min_slots"])
        self.holder = KeyHolder(params, tuple(step["rotation_steps"]))
        self.session: str | None = json.loads(
            self._request("POST", "/sessions", self.holder.public_context()))["session"]

    def __enter__(self) -> HEHttpClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the host's session (idempotent)."""
        with self._lock:
            if self.session is not None:
                session, self.session = self.session, None
                self._request("DELETE", f"/sessions/{session}")

    def _request(self, method: str, route: str, body: bytes | None = None) -> bytes:
        give_up = time.monotonic() + self.busy_wait
        while True:
            request = urllib.request.Request(self.url + route, data=body, method=method)
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                retry = exc.headers.get("Retry-After", "")
                wait = int(retry) if retry.isdigit() else None
                if exc.code == 503 and wait is not None and time.monotonic() + wait <= give_up:
                    time.sleep(wait)
                    continue
                try:
                    reason = str(json.loads(exc.read())["error"])
                except (ValueError, KeyError, TypeError):
                    reason = str(exc.reason)
                hint = f"; retry after {retry} s" if retry else ""
                raise KdsecError(f"HE host refused {method} {route.split('?')[0]} ({exc.code}): "
                                 f"{reason}{hint}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise KdsecError(f"cannot reach the HE host at {self.url}: {getattr(exc, 'reason', exc)}") from None

    def predict_logits(self, inputs: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.session is None:
                raise KdsecError("this HE client is closed: create a new one")
            features = inputs.reshape(len(inputs), -1).astype(np.float64)
            if self.path == "batched":
                if len(features) > self.holder.params.slots:
                    raise ValueError(f"{len(features)} samples exceed {self.holder.params.slots} slots")
                reply = self._infer([features[:, index] for index in self.plan["batched"]["required_inputs"]])
                return np.stack([self.holder.decrypt(ct)[: len(features)] for ct in reply], axis=1)
            single = self.plan["single"]
            layout = single.get("layout", "grid")
            encode = (GridPlan(single["rows"], single["cols"], tuple(single["rotation_steps"])).encode_input
                      if layout == "grid" else GatherPlan.from_dict(single, self.plan["structure"][0][2]).encode_input
                      if layout == "gather"
                      else DiagonalPlan.encode_input)
            rows = []
            for sample in features:
                (reply,) = self._infer(list(np.atleast_2d(encode(sample))))
                rows.append(self.holder.decrypt(reply)[single["output_slots"]])
            return np.stack(rows)

    def _infer(self, rows: list) -> list:
        """Encrypt ``rows`` (seeded ciphertexts: half the upload), send them, load the reply."""
        body = self.holder.encrypt_bundle(rows)
        return self.holder.public.load_ciphertexts(
            self._request("POST", f"/infer/{self.session}?path={self.path}", body))


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
    args = parser.parse_args(argv)
    bounds = {"--max-sessions": args.max_sessions, "--max-session-mib": args.max_session_mib,
              "--idle-timeout": args.idle_timeout, "--max-in-flight": args.max_in_flight,
              "--read-timeout": args.read_timeout, "--max-body-mib": args.max_body_mib}
    try:
        for flag, value in bounds.items():
            if not value > 0:
                raise KdsecError(f"{flag} must be positive, got {value}")
        host = HEHost(he_ops(load_weights(args.model)[0]), args.max_sessions, int(args.max_session_mib * MIB),
                      args.idle_timeout, args.max_in_flight)
        server = make_server(host, args.port, args.host, args.read_timeout, int(args.max_body_mib * MIB))
    except (KdsecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"kdsec HE host listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
