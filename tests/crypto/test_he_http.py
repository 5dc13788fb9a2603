"""A real host process on localhost: it gets the plaintext model and public contexts only, and
stays up, bounded and answering in one line whatever its clients send."""

import http.client
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from kdsec.he import GatherPlan, GatherServer, GridPlan, LinearOp, SquareOp, he_ops, he_program, plaintext_forward
from kdsec.he.host import HEHost
from kdsec.he.client import HEHttpClient
from kdsec.he.tokens import TokenStore
from kdsec.he.server import make_server
from kdsec.config import HEConfig
from kdsec.he.program import batched_params
from kdsec.he.params import BUNDLE_MAGIC, SEAL_HEADER, ZSTD_MAGIC, plan_params
from kdsec.he.seal import KeyHolder, PublicContext, scratch
from kdsec.he.bundle import pack, unpack
from kdsec.errors import IntegrityError, KdsecError
from kdsec.models import ModelSpec, build_model, save_checkpoint


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})
    model = build_model(spec)
    folder = tmp_path_factory.mktemp("host")
    checkpoint = save_checkpoint(model, spec, folder / "student.safetensors")
    # One client token, as a team provisions it; every request below carries it (``_call``, and
    # HEHttpClient through KDSEC_HE_TOKEN). The identity tests are in test_he_identity.py.
    token, _ = TokenStore(folder / "tokens.json").create("tests", "test-host")
    with open(folder / "host.stderr", "w") as stderr:  # a file, not a pipe: a full pipe would stall the host
        # Eight request slots (and eight per client, the one client here): the concurrency tests
        # put eight requests in flight at once.
        process = subprocess.Popen([sys.executable, "-m", "kdsec.he.server", "--model", str(checkpoint),
                                    "--port", "0", "--max-in-flight", "8", "--client-in-flight", "8",
                                    "--client-sessions", "16", "--token-file", str(folder / "tokens.json"),
                                    "--host-id", "test-host"], stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = process.stdout.readline()
    assert "listening on" in line, (folder / "host.stderr").read_text()
    url = line.split("listening on ", 1)[1].split(" ", 1)[0]
    TOKENS[url] = token
    os.environ["KDSEC_HE_TOKEN"] = token
    yield url, he_ops(model)
    del os.environ["KDSEC_HE_TOKEN"]
    process.terminate()
    process.wait(timeout=10)
    assert "Traceback" not in (folder / "host.stderr").read_text()  # no request ever hit an unexpected error


@pytest.fixture(scope="module")
def holders(host):
    """Key holders for both paths of the host's plan, made once (rotation keys take a while)."""
    _, ops = host
    plan = HEHost(ops).plan
    return {path: KeyHolder(plan_params(plan[path]["depth"], 30, 14, "auto", plan[path]["min_slots"]),
                            tuple(plan[path]["rotation_steps"])) for path in ("batched", "single")}


TOKENS: dict[str, str] = {}  # host URL → the client token its requests carry


def _call(url: str, method: str, route: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:  # by hand: http.client would add a Content-Length of its own
        connection.putrequest(method, route, skip_accept_encoding=True)
        headers = {**({"Authorization": f"Bearer {TOKENS[url]}"} if url in TOKENS else {}), **(headers or {})}
        for name, value in headers.items():
            connection.putheader(name, value)
        if body is not None and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _error(status: int, body: bytes) -> str:
    """The one-line JSON error of a refusal."""
    assert 400 <= status < 600 and body.count(b"\n") == 0, (status, body[:300])
    message = json.loads(body)["error"]
    assert isinstance(message, str) and "\n" not in message and "Traceback" not in message, message
    return message


def _open(url: str, context: bytes) -> str:
    status, _, body = _call(url, "POST", "/sessions", context)
    assert status == 200, body[:300]
    return json.loads(body)["session"]


def _batched_infer(url: str, session: str, holder: KeyHolder, ops, inputs: np.ndarray) -> np.ndarray:
    features = inputs.reshape(len(inputs), -1).astype(np.float64)
    required = HEHost(ops).plan["batched"]["required_inputs"]
    body = holder.public.dump_ciphertexts([holder.encrypt(features[:, index]) for index in required])
    status, _, reply = _call(url, "POST", f"/infer/{session}?path=batched", body)
    assert status == 200, reply[:300]
    return np.stack([holder.decrypt(ct)[: len(features)] for ct in holder.public.load_ciphertexts(reply)], axis=1)


@contextmanager
def _serving(ops, read_timeout: float = 30.0, auth=None, tls=None, **bounds):
    """An in-process host with its own bounds (and, given them, its authenticator and TLS context)."""
    he_host = HEHost(ops, **bounds)
    server = make_server(he_host, 0, read_timeout=read_timeout, auth=auth, tls=tls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", he_host
    finally:
        server.shutdown()
        server.server_close()


def _agrees(logits: np.ndarray, plain: np.ndarray) -> bool:
    return bool(np.abs(logits - plain).max() < 1e-2 and (logits.argmax(1) == plain.argmax(1)).all())


# --- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, count", [("batched", 24), ("single", 2)])
def test_round_trip_over_http_agrees_with_plaintext(host, digits, path, count):
    url, ops = host
    with HEHttpClient(url, path=path) as client:
        logits = client.predict_logits(digits.x_test[:count])
        session = client.session
    assert _agrees(logits, plaintext_forward(ops, digits.x_test[:count]))
    status, _, body = _call(url, "POST", f"/infer/{session}?path={path}", b"x")
    assert status == 410 and "open a new session" in _error(status, body)  # closed on leaving the block
    with pytest.raises(KdsecError, match="closed"):
        client.predict_logits(digits.x_test[:1])


def test_parallel_clients_each_get_their_own_right_answers(host, digits):
    url, ops = host
    paths = ["batched", "single"] * 3
    start = threading.Barrier(len(paths))

    def run(index: int) -> list[tuple[np.ndarray, np.ndarray]]:
        path = paths[index]
        with HEHttpClient(url, path=path) as client:
            start.wait(timeout=120)  # every client's requests overlap
            answers = []
            for round_ in range(2):
                inputs = digits.x_test[index * 8 + round_ * 4:][: 4 if path == "batched" else 1]
                answers.append((client.predict_logits(inputs), plaintext_forward(ops, inputs)))
            return answers

    with ThreadPoolExecutor(len(paths)) as pool:
        results = [future.result() for future in [pool.submit(run, index) for index in range(len(paths))]]
    checked = [_agrees(logits, plain) for answers in results for logits, plain in answers]
    print(f"parallel clients: {len(paths)} clients, {len(checked)} answers, {sum(checked)} right")
    assert len(checked) == 12 and all(checked)


def test_a_conv_student_whose_grid_fits_no_ring_is_served_on_the_gather_single_path(digits):
    torch.manual_seed(0)
    spec = ModelSpec("he_cnn", (1, 8, 8), 10, {"channels": [8], "kernel": 3, "stride": 1, "padding": 0,
                                               "hidden": []})
    model = build_model(spec).eval()
    _, ops = he_program(model)  # 64 → 288 → 10: a 512 × 64 grid would need 32,768 slots
    with _serving(ops) as (url, he_host):
        plan = he_host.plan["single"]
        # the geometry (which pixels each output reads), never a weight
        assert plan["layout"] == "gather" and np.shape(plan["columns"]) == (288, 9) and "rows" not in plan
        assert plan["ciphertexts"] == 2 and plan["weight_scale_bits"] == 20  # 9 windows, 8 blocks of 512 a ciphertext
        with HEHttpClient(url, path="single") as client:
            logits = client.predict_logits(digits.x_test[:2])
            held = he_host.sessions[client.session].memory_bytes
            params = client.holder.params
            keys = params.resident_bytes(len(client.holder.public.rotation_steps))
        # its paired chain: inputs and weights at 2^20, one 60-bit prime for the x²
        assert params.coeff_mod_bit_sizes == (60, 60, 60) and params.weight_scale_bits == 20
        assert held == keys + GatherServer.encoded_bytes(ops, params) > keys
        # a context of the classic chain with the same keys is not served on the gather path
        classic = KeyHolder(plan_params(3, 30, 14, 8192), tuple(plan["rotation_steps"]))
        session = _open(url, classic.public_context())
        status, _, body = _call(url, "POST", f"/infer/{session}?path=single", classic.encrypt_bundle([[0.0]]))
        assert status == 400 and b"paired chain at weight_scale_bits 20" in body
    assert _agrees(logits, plaintext_forward(ops, digits.x_test[:2].reshape(2, -1)))


def test_a_malformed_gather_plan_is_refused_before_the_client_packs_anything():
    """A host's /plan is untrusted: its gather fields are checked, each fault one line."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("he_cnn", (1, 8, 8), 10, {"channels": [8], "kernel": 3, "stride": 1, "padding": 0,
                                                           "hidden": []})).eval()
    plan = HEHost(he_program(model)[1]).plan["single"]
    assert GatherPlan.from_dict(plan, 64).columns.shape == (288, 9)
    for change, message in [({"ring_slots": 3000}, "powers of two of a secure ring"),
                            ({"ring_slots": 1 << 20, "block": 1 << 20}, "powers of two of a secure ring"),
                            ({"columns": [[0, 1], [2]]}, "inhomogeneous"),  # ragged
                            ({"columns": [[70]]}, r"input indices in \[-1, 64\)"),
                            ({"columns": [[0] * 5000] * 1000}, "columns must hold 1 to"),
                            ({"hybrids": [[512, 1024, 4]]}, "each hybrid"),
                            ({"weight_scale_bits": 30}, "weight_scale_bits must be 20"),
                            ({"columns": None}, "malformed")]:
        with pytest.raises(KdsecError, match=message) as caught:
            GatherPlan.from_dict({**plan, **change}, 64)
        assert "\n" not in str(caught.value)


def test_a_program_without_a_paired_chain_is_served_on_the_diagonal_single_path(digits):
    rng = np.random.default_rng(0)
    first = np.where(rng.random((288, 64)) < 0.15, rng.normal(size=(288, 64)) * 0.3, 0.0)
    ops = [LinearOp(first, rng.normal(size=288) * 0.1), SquareOp(), SquareOp(),  # x⁴: no paired chain
           LinearOp(rng.normal(size=(10, 288)) * 0.1, rng.normal(size=10))]
    with _serving(ops) as (url, he_host):
        plan = he_host.plan["single"]
        assert plan["layout"] == "diagonal" and "rows" not in plan
        with HEHttpClient(url, path="single") as client:
            logits = client.predict_logits(digits.x_test[:2])
            held = he_host.sessions[client.session].memory_bytes
            keys = client.holder.params.resident_bytes(len(client.holder.public.rotation_steps))
        # the session's encoded diagonals are counted with its keys, from the shapes only (every
        # diagonal a 288 × 64 and a 10 × 288 layer could have, at the levels they are used)
        params = client.holder.params
        assert params.coeff_mod_bit_sizes == (44, 30, 30, 30, 30, 44)
        assert held == keys + (288 + 64 - 1) * params.poly_modulus_degree * 5 * 8 + (
            10 + 288 - 1) * params.poly_modulus_degree * 2 * 8
        # a batched-only context (no rotation keys) is not charged for diagonals it never gets
        batched = KeyHolder(plan_params(4, 30, 14))
        status, _, body = _call(url, "POST", "/sessions", batched.public_context())
        assert status == 200 and json.loads(body)["memory_bytes"] == batched.params.resident_bytes(0)
    assert _agrees(logits, plaintext_forward(ops, digits.x_test[:2].reshape(2, -1)))


@pytest.mark.parametrize("chain", ["classic", "paired"])
def test_a_batched_only_chain_runs_batched_and_is_refused_on_the_single_path(host, digits, chain):
    """Contexts whose chain only the batched server evaluates: the classic one without the last
    rescale (last_scale_bits) and the paired one (weight_scale_bits), here with the single path's
    rotation keys and slots, so that only the chain stands between them and the single path."""
    url, ops = host
    plan = HEHost(ops).plan
    config = HEConfig(batched_chain=chain)
    params = batched_params(plan["structure"], config)
    if chain == "classic":
        params = plan_params(plan["batched"]["depth"], 30, 14, "auto", plan["single"]["min_slots"],
                             unrescaled_last=True)
        assert params.last_scale_bits == 15 and params.depth < plan["batched"]["depth"] == params.program_depth
    else:  # what a default client plans for this alternating student: one 60-bit prime per x²
        assert params.weight_scale_bits == 15 and set(params.coeff_mod_bit_sizes) == {60}
        assert params.slots >= plan["single"]["min_slots"]
    holder = KeyHolder(params, tuple(plan["single"]["rotation_steps"]))
    session = _open(url, holder.public_context())
    logits = _batched_infer(url, session, holder, ops, digits.x_test[:8])
    assert _agrees(logits, plaintext_forward(ops, digits.x_test[:8]))
    body = holder.encrypt_bundle([np.zeros(holder.params.slots)])
    status, _, reply = _call(url, "POST", f"/infer/{session}?path=single", body)
    assert status == 400 and "no last_scale_bits or weight_scale_bits" in _error(status, reply)
    assert _call(url, "DELETE", f"/sessions/{session}")[0] == 200


def test_one_client_shared_by_threads_serializes_its_calls(host, digits):
    url, ops = host
    with HEHttpClient(url) as client, ThreadPoolExecutor(3) as pool:
        chunks = [digits.x_test[i * 4:(i + 1) * 4] for i in range(3)]
        answers = list(pool.map(client.predict_logits, chunks))
    assert all(_agrees(logits, plaintext_forward(ops, chunk)) for logits, chunk in zip(answers, chunks))


def test_threads_serialize_seal_objects_without_sharing_a_file(holders):
    holder = holders["batched"]
    values = [np.full(8, index / 10) for index in range(8)]

    def round_trip(index: int) -> bool:
        for _ in range(10):
            bundle = holder.public.dump_ciphertexts([holder.encrypt(values[index])])
            (ciphertext,) = holder.public.load_ciphertexts(bundle, 1)
            if np.abs(holder.decrypt(ciphertext)[:8] - values[index]).max() > 1e-4:
                return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(8)))


def test_sessions_open_concurrently_and_close(host, holders, digits):
    url, ops = host
    contexts = [holders[path].public_context() for path in ("batched", "single")] * 4
    with ThreadPoolExecutor(len(contexts)) as pool:
        sessions = list(pool.map(lambda context: _open(url, context), contexts))
    assert len(set(sessions)) == 8
    for session in sessions[0::2]:
        inputs = digits.x_test[:4]
        assert _agrees(_batched_infer(url, session, holders["batched"], ops, inputs), plaintext_forward(ops, inputs))
    for session in sessions:
        assert _call(url, "DELETE", f"/sessions/{session}")[0] == 200
    status, _, body = _call(url, "POST", f"/infer/{sessions[0]}", b"x")
    assert status == 410 and "closed: open a new session" in _error(status, body)


# --- bounds -------------------------------------------------------------------------------------


def test_a_full_host_answers_503_until_idle_sessions_expire(host, holders):
    _, ops = host
    context = holders["batched"].public_context()
    with _serving(ops, max_sessions=2, idle_timeout=1.0) as (url, he_host):
        first, _ = _open(url, context), _open(url, context)
        status, headers, body = _call(url, "POST", "/sessions", context)
        assert status == 503 and "host full (2 of 2 sessions open)" in _error(status, body)
        assert 1 <= int(headers["Retry-After"]) <= 2
        time.sleep(1.2)
        third = _open(url, context)  # the two idle ones expired and made room
        assert set(he_host.sessions) == {third}
        status, _, body = _call(url, "POST", f"/infer/{first}", b"x")
        assert status == 410 and "expired after 1 s idle: open a new session" in _error(status, body)
        status, _, body = _call(url, "DELETE", "/sessions/0123456789abcdef")
        assert status == 404 and "unknown session" in _error(status, body)


def test_session_memory_is_estimated_and_capped(host, holders):
    _, ops = host
    batched, single = holders["batched"], holders["single"]
    batched_bytes = batched.params.resident_bytes(0)
    single_bytes = single.params.resident_bytes(len(single.public.rotation_steps))
    print(f"session memory estimate: batched {batched_bytes / 2**20:.1f} MiB, single {single_bytes / 2**20:.1f} MiB")
    assert 13 * 2**20 < batched_bytes < 18 * 2**20 and 70 * 2**20 < single_bytes < 90 * 2**20
    with _serving(ops, max_session_bytes=int(1.5 * batched_bytes)) as (url, he_host):
        status, _, body = _call(url, "POST", "/sessions", batched.public_context())
        assert status == 200 and json.loads(body)["memory_bytes"] == batched_bytes
        status, headers, body = _call(url, "POST", "/sessions", batched.public_context())
        assert status == 503 and "MiB of sessions held" in _error(status, body) and "Retry-After" in headers
        status, _, body = _call(url, "POST", "/sessions", single.public_context())
        assert status == 400 and "over the host's whole session budget" in _error(status, body)
        assert he_host.session_bytes == batched_bytes and not he_host.pending_bytes


def _slow_post(url: str, route: str = "/sessions") -> socket.socket:
    """A client that promises 1000 body bytes and sends 10."""
    parts = urlparse(url)
    slow = socket.create_connection((parts.hostname, parts.port))
    slow.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"0123456789")
    return slow


def _answer(connection: socket.socket, wait: float) -> bytes:
    """Everything the host sends until it closes the connection."""
    connection.settimeout(wait)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_a_stalled_body_holds_nothing_and_gets_408(host, holders):
    _, ops = host
    with _serving(ops, read_timeout=1.0) as (url, _):
        started = time.monotonic()
        with _slow_post(url) as slow:
            assert _call(url, "GET", "/plan")[0] == 200
            assert _open(url, holders["batched"].public_context())  # served while the slow body waits
            answer = _answer(slow, wait=10)
        assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer
        assert 0.9 < time.monotonic() - started < 8


def test_requests_over_the_in_flight_cap_get_503(host, holders):
    _, ops = host
    with _serving(ops, read_timeout=1.0, max_in_flight=1) as (url, _):
        with _slow_post(url) as slow:
            time.sleep(0.2)  # the slow body now holds the only slot
            status, headers, body = _call(url, "POST", "/sessions", holders["batched"].public_context())
            assert status == 503 and "host busy" in _error(status, body) and headers["Retry-After"] == "1"
            assert _call(url, "GET", "/plan")[0] == 200  # reading the plan needs no slot
            # A client retries a 503 after its Retry-After: by then the stalled body got its 408.
            with HEHttpClient(url) as client:
                assert client.session
            assert _answer(slow, wait=10).startswith(b"HTTP/1.1 408")


# --- refusals -----------------------------------------------------------------------------------


def _bundle(header: bytes) -> bytes:
    return BUNDLE_MAGIC + struct.pack(">I", len(header)) + header


def _forged(holder: KeyHolder, blobs: list[bytes] | None = None, **changes) -> bytes:
    header, original = unpack(holder.public_context(), "public-context")
    header = {key: value for key, value in header.items() if key != "sizes"}
    return pack({**header, **changes}, original if blobs is None else blobs)


def test_malformed_requests_get_a_one_line_json_4xx(host, holders):
    url, _ = host
    holder = holders["batched"]
    params = holder.params.as_dict()
    session = _open(url, holder.public_context())
    fresh = holder.encrypt([0.5])
    lowered = holder.encrypt([0.5])
    holder.public.evaluator.mod_switch_to_next_inplace(lowered)
    required = len(HEHost(host[1]).plan["batched"]["required_inputs"])
    cases = [
        ("header is a JSON list", "POST", "/sessions", {}, _bundle(b"[1, 2]"), 400),
        ("missing sizes", "POST", "/sessions", {}, _bundle(json.dumps(
            {"kind": "public-context", "params": params, "roles": ["public_key", "relin_keys"],
             "rotation_steps": []}).encode()), 400),
        ("missing params", "POST", "/sessions", {}, _forged(holder, params=None), 400),
        ("ring degree 1234", "POST", "/sessions", {}, _forged(holder, params={**params, "poly_modulus_degree": 1234}),
         400),
        ("ring degree as a float", "POST", "/sessions", {},
         _forged(holder, params={**params, "poly_modulus_degree": 8192.0}), 400),
        ("insecure modulus", "POST", "/sessions", {},
         _forged(holder, params={**params, "coeff_mod_bit_sizes": [60, 30, 30, 30, 30, 30, 60]}), 400),
        ("no primes of that size", "POST", "/sessions", {},
         _forged(holder, params={"poly_modulus_degree": 32768, "coeff_mod_bit_sizes": [20] * 20, "scale_bits": 20}),
         400),
        ("negative sizes", "POST", "/sessions", {}, _bundle(json.dumps(
            {"kind": "ciphertexts", "sizes": [-5, 10]}).encode()), 400),
        ("huge numbers", "POST", "/sessions", {}, _bundle(b'{"kind": "ciphertexts", "sizes": [' + b"9" * 5000 + b"]}"),
         400),
        ("float overflow", "POST", "/sessions", {}, _bundle(b'{"kind": "ciphertexts", "sizes": [1e999]}'), 400),
        ("NaN", "POST", "/sessions", {}, _bundle(b'{"kind": "ciphertexts", "sizes": [NaN]}'), 400),
        ("deep nesting", "POST", "/sessions", {}, _bundle(b"[" * 100000 + b"]" * 100000), 400),
        ("header length past the end", "POST", "/sessions", {}, BUNDLE_MAGIC + b"\xff\xff\xff\xff{}", 400),
        ("bad magic", "POST", "/sessions", {}, b"NOTKDSEC" + b"\0" * 64, 400),
        ("ciphertexts as a context", "POST", "/sessions", {}, holder.public.dump_ciphertexts([fresh]), 400),
        ("Content-Length abc", "POST", "/sessions", {"Content-Length": "abc"}, None, 400),
        ("Content-Length -1", "POST", "/sessions", {"Content-Length": "-1"}, None, 400),
        ("empty body", "POST", "/sessions", {"Content-Length": "0"}, None, 400),
        ("no Content-Length", "POST", "/sessions", {}, None, 411),
        ("chunked and a length", "POST", "/sessions", {"Transfer-Encoding": "chunked", "Content-Length": "5"},
         b"0\r\n\r\n", 400),
        ("gzip", "POST", "/sessions", {"Transfer-Encoding": "gzip, chunked"}, b"0\r\n\r\n", 400),
        ("chunked, empty", "POST", "/sessions", {"Transfer-Encoding": "chunked"}, b"0\r\n\r\n", 400),
        ("chunk size not hex", "POST", "/sessions", {"Transfer-Encoding": "chunked"}, b"zz\r\n\r\n", 400),
        ("chunk without its CRLF", "POST", "/sessions", {"Transfer-Encoding": "chunked"}, b"2\r\nabcd\r\n", 400),
        ("oversized body", "POST", "/sessions", {"Content-Length": "999999999999"}, None, 413),
        ("unknown route", "GET", "/admin", {}, None, 404),
        ("wrong method", "PUT", "/plan", {}, b"x", 405),
        ("GET on a POST route", "GET", "/sessions", {}, None, 405),
        ("unknown session", "POST", "/infer/0123456789abcdef", {}, b"x", 404),
        ("unknown session, 8 MiB body", "POST", "/infer/0123456789abcdef", {}, bytes(8 << 20), 404),
        ("malformed session id", "POST", "/infer/..%2f..", {}, b"x", 404),
        ("unknown path", "POST", f"/infer/{session}?path=other", {}, b"x", 400),
        ("a context as ciphertexts", "POST", f"/infer/{session}", {}, holder.public_context(), 400),
        ("wrong ciphertext count", "POST", f"/infer/{session}", {}, holder.public.dump_ciphertexts([fresh]), 400),
        ("a ciphertext one level down", "POST", f"/infer/{session}", {},
         holder.public.dump_ciphertexts([lowered] * required), 400),
        ("shallow session on the single path", "POST", f"/infer/{session}?path=single", {},
         holder.public.dump_ciphertexts([fresh]), 400),
    ]
    for name, method, route, headers, body, expected in cases:
        status, _, answer = _call(url, method, route, body, headers)
        assert status == expected, (name, status, answer[:300])
        _error(status, answer)
    with socket.create_connection((urlparse(url).hostname, urlparse(url).port)) as raw:
        raw.sendall(b"\x16\x03\x01 / HTTP/1.x\r\n\r\n")
        answer = _answer(raw, wait=10)
    assert answer.startswith(b"HTTP/1.1 400") and b'{"error": ' in answer
    assert _call(url, "DELETE", f"/sessions/{session}")[0] == 200


def test_a_context_smuggling_a_secret_key_is_refused(host, holders):
    url, _ = host
    holder = holders["batched"]
    header, blobs = unpack(holder.public_context(), "public-context")
    secret = scratch().dump(holder._secret_key)
    forgeries = {
        "an extra header field": (_forged(holder, secret=secret.hex()), "secret: Extra inputs are not permitted"),
        "a secret-key role": (_forged(holder, blobs + [secret], roles=header["roles"] + ["secret_key"]),
                              "a secret key is never accepted"),
        "appended to the public key": (_forged(holder, [blobs[0] + secret, blobs[1]]), "trailing or missing bytes"),
        # SEAL reads a secret key (a plaintext) as a public key (a ciphertext) and finds it invalid.
        "in place of the public key": (_forged(holder, [secret, blobs[1]]), "public key is not a valid SEAL object"),
    }
    for name, (forged, reason) in forgeries.items():
        assert holder.secret_key_in(forged) or secret.hex().encode() in forged, name  # it does carry the key
        status, _, body = _call(url, "POST", "/sessions", forged)
        assert status == 400 and reason in _error(status, body), (name, body)


def _zstd_ciphertext(holder: KeyHolder, parts: int) -> bytes:
    """A ciphertext of ``parts`` zero polynomials in zstd frames SEAL accepts: the metadata in a raw
    block, then the data as 128 KiB run-length blocks of 4 bytes each."""
    version = scratch().dump(holder.encrypt([0.0]))[:5]  # SEAL's magic, header size and version

    def seal_header(compression: int, size: int) -> bytes:
        return version + bytes([compression, 0, 0]) + struct.pack("<Q", size)

    ring, primes = holder.params.poly_modulus_degree, len(holder.params.coeff_mod_bit_sizes) - 1
    words = parts * ring * primes
    # Ciphertext members: parms_id, NTT form, size, ring, primes, scale, correction factor, then the data array.
    members = (struct.pack("<4Q", *holder.context.first_parms_id()) + b"\x01"
               + struct.pack("<QQQdQ", parts, ring, primes, holder.params.scale, 1)
               + seal_header(0, SEAL_HEADER.size + 8 + words * 8) + struct.pack("<Q", words))
    frame = ZSTD_MAGIC + b"\x00\x58" + (len(members) << 3).to_bytes(3, "little") + members
    blocks = words * 8 // (128 * 1024)
    for index in range(blocks):
        frame += ((1 << 1) | ((128 * 1024) << 3) | (index == blocks - 1)).to_bytes(3, "little") + b"\x00"
    return seal_header(2, SEAL_HEADER.size + len(frame)) + frame


def test_a_compression_bomb_is_refused_before_seal_allocates(holders):
    holder = holders["batched"]
    public = PublicContext.deserialize(holder.public_context())
    (zero,) = public.load_ciphertexts(pack({"kind": "ciphertexts"}, [_zstd_ciphertext(holder, 2)]))
    assert zero.size() == 2 and np.abs(holder.decrypt(zero)[:4]).max() < 1e-3  # the crafted frames are valid
    bomb = pack({"kind": "ciphertexts"}, [_zstd_ciphertext(holder, 16)])  # 4 MiB of data in ~1 KiB
    assert len(bomb) < 2048
    with pytest.raises(IntegrityError, match="would inflate past"):
        public.load_ciphertexts(bomb)


# --- fuzzing: every mutant is answered 200 or with a one-line JSON 4xx, and the host stays up -----


def _mutate_header(header: dict, rng: random.Random) -> dict:
    header = json.loads(json.dumps(header))
    target = header["params"] if "params" in header and rng.random() < 0.4 else header
    key = rng.choice(sorted(target))
    values = [None, True, 1.5, -1, 0, 2**64, 10**30, "x" * 50, [], {}, [[[[1]]]], [-1, 2**40], {"a": [1, {"b": None}]},
              json.loads("[" * 150 + "]" * 150), ["public_key", "secret_key"], 4096, 32768]
    match rng.choice(["delete", "add", "retype", "nest"]):
        case "delete":
            del target[key]
        case "add":
            target[rng.choice(["secret_key", "extra", "sizes2", key + "_"])] = rng.choice(values)
        case "retype":
            target[key] = rng.choice(values)
        case "nest":
            target[key] = [target[key]] * rng.randint(1, 3)
    return header


def _mutant(bundle: bytes, kind: str, rng: random.Random) -> bytes:
    header, blobs = unpack(bundle, kind)
    blob = bytearray(bundle)
    match rng.choice(["flip", "flip-header", "truncate", "insert", "header", "header-stale-sizes"]):
        case "flip":
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        case "flip-header":  # inside the bundle header or a SEAL object's own header
            start = len(bundle) - sum(header["sizes"])
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(start) if rng.random() < 0.5 else start + rng.randrange(24)
                blob[at] = rng.randrange(256)
        case "truncate":
            del blob[rng.randrange(len(blob)):]
        case "insert":
            at = rng.randrange(len(blob))
            blob[at:at] = rng.randbytes(rng.randint(1, 64))
        case "header":  # sizes recomputed: the mutant reaches the typed checks
            return pack(_mutate_header({k: v for k, v in header.items() if k != "sizes"}, rng), blobs)
        case "header-stale-sizes":
            head = json.dumps(_mutate_header(header, rng)).encode()
            return BUNDLE_MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)
    return bytes(blob)


def test_fuzzed_bundles_are_refused_cleanly_and_the_host_stays_up(host, holders, digits):
    url, ops = host
    rng = random.Random(20240611)
    context = holders["batched"].public_context()
    single = holders["single"]
    single_session = _open(url, single.public_context())
    plan = HEHost(ops).plan["single"]
    grid = GridPlan(plan["rows"], plan["cols"], tuple(plan["rotation_steps"]))
    ciphertexts = single.public.dump_ciphertexts([single.encrypt(grid.encode_input(digits.x_test[0].reshape(-1)))])
    counts = {"cases": 0, "accepted": 0, "rejected": 0, "statuses": {}}
    for index in range(300):
        if index % 2 == 0:
            status, _, body = _call(url, "POST", "/sessions", _mutant(context, "public-context", rng))
            if status == 200:
                assert _call(url, "DELETE", f"/sessions/{json.loads(body)['session']}")[0] == 200
        else:
            status, _, body = _call(url, "POST", f"/infer/{single_session}?path=single",
                                    _mutant(ciphertexts, "ciphertexts", rng))
        counts["cases"] += 1
        counts["statuses"][status] = counts["statuses"].get(status, 0) + 1
        if status == 200:
            counts["accepted"] += 1
        else:
            assert 400 <= status < 500, (index, status, body[:300])
            _error(status, body)
            counts["rejected"] += 1
    print(f"HTTP fuzz: {counts}")
    assert counts["cases"] == 300 and counts["rejected"] >= 250
    assert _call(url, "GET", "/plan")[0] == 200
    assert _call(url, "DELETE", f"/sessions/{single_session}")[0] == 200
