"""Who may use an HE host, and how much: bearer tokens (401 / 403), each client's own share of
sessions, memory, requests in flight and answered samples (429 + Retry-After), client faults as
4xx, and TLS with a client that verifies the host."""

from __future__ import annotations

import datetime
import json
import os
import socket
import stat
import subprocess
import sys
import time
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from kdsec.errors import KdsecError
from kdsec.he import plaintext_forward
from kdsec.he.client import HEHttpClient
from kdsec.he.host import ClientLimits, HEHost
from kdsec.he.server import tls_context
from kdsec.he.tokens import TOKEN, Authenticator, TokenStore, budget_from_audit
from kdsec.models import ModelSpec, build_model, save_checkpoint
from tests.crypto.test_he_http import _answer, _call, _error
from tests.crypto.test_he_http import _serving as serving


@pytest.fixture
def tokens(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    return store, {name: store.create(name, "he-1")[0] for name in ("alice", "bob")}


def _serving(ops, store: TokenStore | None, limits: ClientLimits = ClientLimits(), tls=None, **bounds):
    """An in-process host for host id 'he-1', checking ``store``'s tokens."""
    return serving(ops, read_timeout=1.0, auth=store and Authenticator(store, "he-1"), tls=tls, clients=limits,
                   **bounds)


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_but_health_and_plan_needs_a_valid_token_for_this_host(ops, holder, tokens):
    store, issued = tokens
    alice = issued["alice"]
    assert alice not in store.path.read_text() and stat.S_IMODE(store.path.stat().st_mode) == 0o600
    other_host, _ = store.create("carol", "he-2")
    short_lived, _ = store.create("dave", "he-1", days=1e-6)  # 0.09 s
    time.sleep(0.2)
    context = holder.public_context()
    with _serving(ops, store) as (url, he_host):
        assert _call(url, "GET", "/health")[0] == 200 and _call(url, "GET", "/plan")[0] == 200
        secret = TOKEN.fullmatch(alice).group(2)
        cases = [
            ("no credential", {}, 401, "a client token is required"),
            ("basic auth", {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, 401, "malformed credential"),
            ("not a kdsec token", _as("abc.def.ghi"), 401, "malformed credential"),
            ("wrong secret", _as(alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")), 401,
             "unknown or wrong token"),
            ("unknown id", _as("kdsec-he_000000000000_" + secret), 401, "unknown or wrong token"),
            ("another host's", _as(other_host), 403, "is for host 'he-2', not this one ('he-1')"),
            ("expired", _as(short_lived), 403, "expired"),
        ]
        for name, headers, expected, message in cases:
            # a small body: the credential is checked before any body is read
            status, answer_headers, body = _call(url, "POST", "/sessions", b"x", headers)
            assert status == expected, (name, status, body[:200])
            status, _, who = _call(url, "GET", "/whoami", None, headers)  # what a client asks before a large upload
            assert status == expected and message in _error(status, who), name
            assert message in _error(status, body), name
            assert secret not in body.decode(), name  # a refusal never echoes a secret
            if expected == 401:
                assert answer_headers["WWW-Authenticate"] == 'Bearer realm="kdsec-he"'
        status, _, body = _call(url, "POST", "/sessions", context, _as(alice))
        assert status == 200
        session = json.loads(body)["session"]
        assert json.loads(_call(url, "GET", "/whoami", None, _as(alice))[2]) == {"client": "alice", "host": "he-1"}
        # Revoked while the host runs: refused from the next request on, session or not.
        store.revoke(alice.split("_")[1])
        status, _, body = _call(url, "POST", f"/infer/{session}", b"x", _as(alice))
        assert status == 403 and "was revoked" in _error(status, body)
        # A client without a credential is answered before its body, which is not read: the answer
        # comes while it has sent headers only, then the connection closes.
        parts = urlparse(url)
        with socket.create_connection((parts.hostname, parts.port)) as raw:
            raw.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n")
            head, _, body = _answer(raw, wait=10).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401") and "a client token is required" in _error(401, body)


def test_a_session_belongs_to_the_client_that_opened_it(ops, holder, tokens):
    store, issued = tokens
    with _serving(ops, store) as (url, _):
        status, _, body = _call(url, "POST", "/sessions", holder.public_context(), _as(issued["alice"]))
        session = json.loads(body)["session"]
        for method, route in (("POST", f"/infer/{session}"), ("DELETE", f"/sessions/{session}")):
            status, _, body = _call(url, method, route, b"x" if method == "POST" else None, _as(issued["bob"]))
            assert status == 404 and "unknown session" in _error(status, body)
        assert _call(url, "DELETE", f"/sessions/{session}", None, _as(issued["alice"]))[0] == 200


def test_one_client_flooding_sessions_never_locks_another_out(ops, holder, tokens):
    store, issued = tokens
    context = holder.public_context()
    with _serving(ops, store, ClientLimits(sessions=3), max_sessions=8, idle_timeout=60) as (url, he_host):
        for _ in range(3):
            assert _call(url, "POST", "/sessions", context, _as(issued["alice"]))[0] == 200
        status, headers, body = _call(url, "POST", "/sessions", context, _as(issued["alice"]))
        assert status == 429 and "client 'alice' holds 3 of 3 sessions" in _error(status, body)
        assert 1 <= int(headers["Retry-After"]) <= 60
        for _ in range(3):  # bob still gets his share
            assert _call(url, "POST", "/sessions", context, _as(issued["bob"]))[0] == 200
        assert sorted(session.client for session in he_host.sessions.values()) == ["alice"] * 3 + ["bob"] * 3


def test_each_client_has_its_own_memory_share(ops, holder, tokens):
    store, issued = tokens
    needed = holder.params.resident_bytes(0)
    with _serving(ops, store, ClientLimits(session_bytes=int(1.5 * needed))) as (url, _):
        assert _call(url, "POST", "/sessions", holder.public_context(), _as(issued["alice"]))[0] == 200
        status, headers, body = _call(url, "POST", "/sessions", holder.public_context(), _as(issued["alice"]))
        assert status == 429 and "MiB of sessions" in _error(status, body) and "Retry-After" in headers
        assert _call(url, "POST", "/sessions", holder.public_context(), _as(issued["bob"]))[0] == 200


def test_a_client_over_its_requests_in_flight_gets_429_and_others_go_on(ops, holder, tokens):
    store, issued = tokens
    with _serving(ops, store, ClientLimits(in_flight=1)) as (url, _):
        parts = urlparse(url)  # alice's one slot held by a body that stalls
        slow = socket.create_connection((parts.hostname, parts.port))
        slow.sendall(f"POST /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {issued['alice']}\r\n"
                     "Content-Length: 1000\r\n\r\n0123456789".encode())
        with slow:
            time.sleep(0.2)
            status, headers, body = _call(url, "POST", "/sessions", holder.public_context(), _as(issued["alice"]))
            assert status == 429 and "requests in flight" in _error(status, body) and headers["Retry-After"] == "1"
            assert _call(url, "POST", "/sessions", holder.public_context(), _as(issued["bob"]))[0] == 200
            assert _answer(slow, wait=10).startswith(b"HTTP/1.1 408")


def test_the_query_budget_counts_answered_samples_per_client_and_window(ops, holder, tokens, digits):
    store, issued = tokens
    slots = holder.params.slots
    required = HEHost(ops).plan["batched"]["required_inputs"]
    features = digits.x_test[:4].reshape(4, -1).astype(np.float64)
    body = holder.public.dump_ciphertexts([holder.encrypt(features[:, index]) for index in required])
    with _serving(ops, store, ClientLimits(budget=slots, window=2.0)) as (url, _):
        sessions = {name: json.loads(_call(url, "POST", "/sessions", holder.public_context(), _as(token))[2])["session"]
                    for name, token in issued.items()}
        status, _, reply = _call(url, "POST", f"/infer/{sessions['alice']}", body, _as(issued["alice"]))
        assert status == 200  # a batched request is charged its ring's slots: the whole budget here
        logits = np.stack([holder.decrypt(ct)[:4] for ct in holder.public.load_ciphertexts(reply)], axis=1)
        assert np.abs(logits - plaintext_forward(ops, digits.x_test[:4])).max() < 1e-2
        status, headers, answer = _call(url, "POST", f"/infer/{sessions['alice']}", body, _as(issued["alice"]))
        assert status == 429 and f"has had {slots} of its {slots} samples per 2 s" in _error(status, answer)
        assert 1 <= int(headers["Retry-After"]) <= 2
        assert _call(url, "POST", f"/infer/{sessions['bob']}", body, _as(issued["bob"]))[0] == 200  # bob's own
        time.sleep(2.1)  # the window moved on
        assert _call(url, "POST", f"/infer/{sessions['alice']}", body, _as(issued["alice"]))[0] == 200
    with _serving(ops, store, ClientLimits(budget=slots - 1)) as (url, _):
        session = json.loads(_call(url, "POST", "/sessions", holder.public_context(), _as(issued["alice"]))[2])
        status, _, answer = _call(url, "POST", f"/infer/{session['session']}", body, _as(issued["alice"]))
        assert status == 429 and "over client 'alice''s whole budget" in _error(status, answer)


def test_the_default_budget_is_the_queries_the_extraction_audit_measured(tmp_path):
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"extraction": [
        {"defense": "top1", "queries": 500, "fidelity": 0.96},
        {"defense": "probabilities", "queries": 500, "fidelity": 0.975}]}))
    assert budget_from_audit(audit) == 500
    audit.write_text(json.dumps({"extraction": []}))
    with pytest.raises(KdsecError, match="no extraction audit of the probabilities interface"):
        budget_from_audit(audit)


def test_a_truncated_body_then_a_close_is_a_400_never_a_500(ops, tokens):
    store, issued = tokens
    with _serving(ops, store) as (url, _):
        parts = urlparse(url)
        with socket.create_connection((parts.hostname, parts.port)) as client:
            client.sendall(f"POST /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {issued['alice']}\r\n"
                           "Content-Length: 1000\r\n\r\n0123456789".encode())
            client.shutdown(socket.SHUT_WR)  # the body ends here: 10 bytes of the 1000 promised
            answer = _answer(client, wait=10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), head
        assert "the body ended after 10 of its 1000 bytes" in _error(400, body)


def _self_signed(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_over_tls_a_verifying_client_round_trips_and_an_unverified_host_is_refused(ops, tokens, digits, tmp_path):
    store, issued = tokens
    cert, key = _self_signed(tmp_path)
    with _serving(ops, store, tls=tls_context(cert, key)) as (url, _):
        with HEHttpClient(url, token=issued["alice"], cafile=str(cert)) as client:
            logits = client.predict_logits(digits.x_test[:3])
        assert np.abs(logits - plaintext_forward(ops, digits.x_test[:3])).max() < 1e-2
        with pytest.raises(KdsecError, match="CERTIFICATE_VERIFY_FAILED"):
            HEHttpClient(url, token=issued["alice"])  # the system's CAs do not know this host
        parts = urlparse(url)
        with socket.create_connection((parts.hostname, parts.port)) as plain:  # plain HTTP to a TLS port
            plain.sendall(b"GET /plan HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = _answer(plain, wait=10)
            except ConnectionResetError:  # the failed handshake's close
                answer = b""
            assert not answer.startswith(b"HTTP/")
    with pytest.raises(KdsecError, match="over plain HTTP: use https://"):
        HEHttpClient("http://he.example.org:8765", token=issued["alice"])
    with pytest.raises(KdsecError, match="cannot load the TLS certificate"):
        tls_context(key, cert)


def test_the_host_command_requires_tokens_and_reports_its_budget(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})
    checkpoint = save_checkpoint(build_model(spec), spec, tmp_path / "student.safetensors")
    command = [sys.executable, "-m", "kdsec.he.server", "--model", str(checkpoint), "--port", "0"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "give --token-file" in refused.stderr and "Traceback" not in refused.stderr
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"extraction": [{"defense": "probabilities", "queries": 500, "fidelity": 0.97}]}))
    cli = [sys.executable, "-m", "kdsec.cli", "he-token", "create", "--client", "ci", "--host-id", "h",
           "--store", str(tmp_path / "tokens.json")]
    made = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    token = made.stdout.strip()
    assert made.returncode == 0 and token.startswith("kdsec-he_") and "shown once" in made.stderr
    host = subprocess.Popen([*command, "--token-file", str(tmp_path / "tokens.json"), "--host-id", "h",
                             "--audit", str(audit)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = host.stdout.readline()
        assert "host id h; query budget 500 samples per client per 86400 s" in line, host.stderr.read()
        url = line.split("listening on ", 1)[1].split(" ", 1)[0]
        assert _call(url, "POST", "/sessions", b"x")[0] == 401
        os.environ.pop("KDSEC_HE_TOKEN", None)
        with pytest.raises(KdsecError, match="this host requires a client token: pass token= or set KDSEC_HE_TOKEN"):
            HEHttpClient(url)
        with pytest.raises(KdsecError, match=r"GET /whoami \(401\): unknown or wrong token"):
            HEHttpClient(url, token=token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
        with HEHttpClient(url, token=token) as client:
            assert client.client == "ci"
    finally:
        host.terminate()
        host.wait(timeout=10)
