"""Encrypted-input inference over HTTP: a host that holds the plaintext model and only public
contexts (``HEHost`` here, ``kdsec.he.server`` on the wire), and the client (key holder,
``kdsec.he.client``) that talks to it.

Endpoints (bodies are kdsec HE bundles, see ``kdsec.he.bundle.pack``)::

    GET    /health               {"status": "ok"}                                   (no token)
    GET    /plan                 layer shapes, depth and rotation steps per path, how clients
                                 authenticate (no weights)                           (no token)
    GET    /whoami               the token's client and this host's id
    POST   /sessions             body: a public context → {"session": id, "memory_bytes": estimate}
    DELETE /sessions/<id>        close a session and free its keys
    POST   /infer/<id>?path=P    body: ciphertexts → ciphertexts (P: batched | single)

Every error is one line of JSON, ``{"error": "..."}``: 400 malformed input (bad bundle, wrong
parameters, wrong count, a body cut short), 401 no or a wrong token (with WWW-Authenticate), 403 a
revoked or expired token or one for another host, 404 unknown route or session (another client's
sessions are unknown to this one), 405 wrong method, 408 body too slow, 410 session expired or
closed (open a new one), 411/413 missing or oversized body, 429 over this client's share (with
Retry-After), 503 host full or busy (with Retry-After), 500 anything unexpected (logged on the
host, never sent).

The host never receives, stores or could use a secret key: ``PublicContext.deserialize``
accepts exactly a public key, relinearization keys and the declared rotation keys.

Bounds: open sessions (count and estimated bytes, ``HEParams.resident_bytes``), idle expiry,
requests in flight, body size, and a read timeout per socket read plus a minimum upload rate;
per client (``ClientLimits``): sessions, their bytes, requests in flight and samples answered
per window. We keep the stdlib ``ThreadingHTTPServer`` (HTTP/1.1): tests show it handles what
uvicorn would (keep-alive, pipelining, slow senders, chunked bodies: ``test_he_http_protocol``),
a thread per connection is cheap next to one CKKS evaluation, and SEAL holds the GIL, so an async
server would not evaluate more at once. Connections themselves are not counted: one waiting for
its headers holds a thread (never a work slot) until ``read_timeout`` passes between bytes.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kdsec.config import HEConfig
from kdsec.errors import KdsecError
from kdsec.he import (
    BatchedServer,
    DiagonalPlan,
    DiagonalServer,
    GatherPlan,
    GatherServer,
    GridPlan,
    SingleServer,
    model_structure,
    single_plan,
)
from kdsec.he.gather import GATHER_WEIGHT_SCALE_BITS
from kdsec.he.params import HEParams
from kdsec.he.program import alternates
from kdsec.he.seal import PublicContext

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
ANONYMOUS = "anonymous"  # every client of a host that authenticates nobody (--no-auth)
log = logging.getLogger(__name__)


def _one_line(message: str) -> str:
    return " ".join(message.split())[:500]


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


class ClientLimit(HostBusy):
    """One client over its own share (sessions, memory, requests in flight, query budget)."""

    status = 429


@dataclass(frozen=True)
class ClientLimits:
    """What one client (one token's name) may hold, so that no client locks another out: open
    sessions and their estimated bytes, requests in flight, and samples answered per ``window``
    seconds (``budget``; None: no budget). A batched request is charged the samples its ring can
    hold (the host cannot see how many the client packed), a single-path request the samples its
    ring holds at the layout's slot count (one where the layout fills the ring)."""

    sessions: int = 4
    session_bytes: int = 1024 * MIB  # a conv student's diagonal single-path session is ~730 MiB
    in_flight: int = 2
    budget: int | None = None
    window: float = 86400.0


@dataclass
class _Session:
    servers: dict[str, BatchedServer | SingleServer | DiagonalServer]
    memory_bytes: int
    last_used: float
    client: str = ANONYMOUS
    users: int = 0  # requests holding it now: a session in use never expires
    # One evaluation at a time: the evaluator's PublicContext.counts is mutated during evaluation.
    lock: threading.Lock = field(default_factory=threading.Lock)


class HEHost:
    """The model, its plan and the open sessions, within the given bounds."""

    def __init__(self, ops, max_sessions: int = MAX_SESSIONS, max_session_bytes: int = MAX_SESSION_BYTES,
                 idle_timeout: float = IDLE_TIMEOUT, max_in_flight: int = MAX_IN_FLIGHT,
                 clients: ClientLimits = ClientLimits()) -> None:
        self.ops, self.clients = ops, clients
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
        self.pending_by: Counter[str] = Counter()  # per client: sessions admitted, still being deserialized
        self.pending_bytes_by: Counter[str] = Counter()
        self.in_flight_by: Counter[str] = Counter()  # per client: requests holding a work slot
        self.answered: dict[str, deque[tuple[float, int]]] = {}  # per client: (when, samples) in the window
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

    def _retry_after(self, sessions) -> int:
        now = time.monotonic()
        idle = [session.last_used + self.idle_timeout - now for session in sessions if not session.users]
        return max(1, math.ceil(min(idle))) if idle else max(1, math.ceil(self.idle_timeout))

    def _admit(self, needed: int, client: str) -> None:
        """Reserve room for a session of ``needed`` bytes for ``client`` (within its own share
        first, then the host's), or say when to retry. Under ``self.lock``."""
        share = self.clients
        if needed > min(self.max_session_bytes, share.session_bytes):
            raise HostError(f"this context needs ~{needed / MIB:.0f} MiB, over the host's whole session budget "
                            f"of {min(self.max_session_bytes, share.session_bytes) / MIB:.0f} MiB (per client): "
                            "use smaller parameters")
        own = [session for session in self.sessions.values() if session.client == client]
        own_count = len(own) + self.pending_by[client]
        own_bytes = sum(session.memory_bytes for session in own) + self.pending_bytes_by[client]
        if own_count >= share.sessions or own_bytes + needed > share.session_bytes:
            what = (f"{own_count} of {share.sessions} sessions" if own_count >= share.sessions else
                    f"{own_bytes / MIB:.0f} of {share.session_bytes / MIB:.0f} MiB of sessions, this one needs "
                    f"{needed / MIB:.0f}")
            raise ClientLimit(f"client '{client}' holds {what}: close one (DELETE /sessions/<id>) or wait for "
                              "it to expire", self._retry_after(own))
        count = len(self.sessions) + self.pending_sessions
        used = self.session_bytes + self.pending_bytes
        if count < self.max_sessions and used + needed <= self.max_session_bytes:
            self.pending_sessions, self.pending_bytes = self.pending_sessions + 1, self.pending_bytes + needed
            self.pending_by[client] += 1
            self.pending_bytes_by[client] += needed
            return
        retry = self._retry_after(self.sessions.values())
        what = (f"{count} of {self.max_sessions} sessions open" if count >= self.max_sessions else
                f"{used / MIB:.0f} of {self.max_session_bytes / MIB:.0f} MiB of sessions held, "
                f"this one needs {needed / MIB:.0f}")
        raise HostBusy(f"host full ({what}): retry later or close an unused session", retry)

    def open_session(self, body: bytes, client: str = ANONYMOUS) -> tuple[str, int]:
        """A new session of ``client`` for a public context: its id and estimated memory."""
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
            self._admit(needed, client)
        try:
            public = PublicContext.deserialize(body)
            servers = {path: (BatchedServer(public, self.ops, self._residue_layers) if path == "batched"
                              else self._single(public, self.ops)) for path in paths}
            session_id = secrets.token_hex(8)
            with self.lock:
                self.sessions[session_id] = _Session(servers, needed, time.monotonic(), client)
        finally:
            with self.lock:
                self.pending_sessions, self.pending_bytes = self.pending_sessions - 1, self.pending_bytes - needed
                self.pending_by[client] -= 1
                self.pending_bytes_by[client] -= needed
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

    def close_session(self, session_id: str, client: str = ANONYMOUS) -> None:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is not None and session.client == client:
                self._end(session_id, "closed")
            elif session is not None or session_id not in self.ended:  # another client's: not there for this one
                raise NotFound(f"unknown session '{session_id}'")

    def _use(self, session_id: str, client: str) -> _Session:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is not None and session.client != client:
                raise NotFound(f"unknown session '{session_id}': open a new session (POST /sessions)")
            if session is None:
                if session_id in self.ended:
                    raise SessionGone(f"session '{session_id}' {self.ended[session_id]}: open a new session "
                                      "(POST /sessions)")
                raise NotFound(f"unknown session '{session_id}': open a new session (POST /sessions)")
            session.users += 1
            return session

    @contextmanager
    def work_slot(self, client: str = ANONYMOUS) -> Iterator[None]:
        """One of the host's ``max_in_flight`` work slots, within the client's own share
        (``ClientLimits.in_flight``): 429 over the client's share, 503 when the host is busy."""
        with self.lock:
            if self.in_flight_by[client] >= self.clients.in_flight:
                raise ClientLimit(f"client '{client}' has {self.in_flight_by[client]} requests in flight, its "
                                  f"limit: wait for one to finish", 1)
            if not self.in_flight.acquire(blocking=False):
                raise HostBusy("host busy: every request slot is in use; retry shortly", 1)
            self.in_flight_by[client] += 1
        try:
            yield
        finally:
            with self.lock:
                self.in_flight_by[client] -= 1
            self.in_flight.release()

    def samples(self, params: HEParams, path: str) -> int:
        """What a request on ``path`` with ``params`` is charged: the samples it could answer."""
        return params.slots if path == "batched" else max(1, params.slots // self.plan["single"]["min_slots"])

    def check_budget(self, session_id: str, path: str, client: str = ANONYMOUS) -> None:
        """Before a body is read: refuse (429) a request the client's budget cannot take now."""
        if self.clients.budget is None:
            return
        with self.lock:
            session = self.sessions.get(session_id)
            server = session.servers.get(path) if session is not None and session.client == client else None
        if server is not None:  # else infer() says what is wrong
            self._charge(client, self.samples(server.public.params, path), record=False)

    def _charge(self, client: str, samples: int, record: bool = True) -> tuple[float, int] | None:
        """Count ``samples`` against the client's budget (the entry, for ``_refund``), or refuse
        with when it has room again; ``record`` false only checks."""
        budget = self.clients.budget
        if budget is None:
            return None
        now = time.monotonic()
        with self.lock:
            spent = self.answered.setdefault(client, deque())
            while spent and spent[0][0] <= now - self.clients.window:
                spent.popleft()
            used = sum(samples for _, samples in spent)
            if used + samples > budget:
                if samples > budget:
                    raise ClientLimit(f"a request of {samples} samples is over client '{client}''s whole budget of "
                                      f"{budget} per {self.clients.window:g} s: use the single path or ask for a "
                                      "larger budget", math.ceil(self.clients.window))
                # the oldest answers that must leave the window before this request fits
                freed, retry = used + samples - budget, self.clients.window
                for when, count in spent:
                    freed -= count
                    if freed <= 0:
                        retry = when + self.clients.window - now
                        break
                raise ClientLimit(f"client '{client}' has had {used} of its {budget} samples per "
                                  f"{self.clients.window:g} s (this request: {samples})", max(1, math.ceil(retry)))
            if not record:
                return None
            entry = (now, samples)
            spent.append(entry)
            return entry

    def _refund(self, client: str, entry: tuple[float, int] | None) -> None:
        """Take back the charge ``entry`` (this request's own, by identity)."""
        if entry is None:
            return
        with self.lock:
            spent = self.answered.get(client, deque())
            for index, charged in enumerate(spent):
                if charged is entry:
                    del spent[index]
                    break

    def infer(self, session_id: str, path: str, body: bytes, client: str = ANONYMOUS) -> bytes:
        self.expire()
        session = self._use(session_id, client)
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
                charge = self._charge(client, self.samples(public.params, path))
                try:
                    outputs = server.infer(ciphertexts)
                    return public.dump_ciphertexts(outputs)
                except (ValueError, RuntimeError) as exc:  # SEAL refusing what this client's parameters ask
                    self._refund(client, charge)
                    reason = _one_line(str(exc))[:200]
                    raise HostError(f"these parameters cannot evaluate the model: {reason}") from None
                except BaseException:
                    self._refund(client, charge)
                    raise
        finally:
            with self.lock:
                session.users -= 1
                session.last_used = time.monotonic()


