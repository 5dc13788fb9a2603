"""Verdict attestations: only the pipeline's key produces one, and one speaks of one version only."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from kdsec.crypto import attestation
from kdsec.crypto.keys import generate_key_file, load_or_create_signer, public_key_path
from kdsec.errors import IntegrityError, KeyMaterialError

BOUND = {"model": "kdsec-student", "version": "3", "source": "models:/m-abc", "run_id": "r1"}
VERDICT = attestation.Verdict(**BOUND, pipeline_run="p1", audit_sha256="a" * 64,
                              model_sha256="b" * 64, gates={"accuracy": "pass", "he": "pass"},
                              verdict="pass", launched_by="kdsec-pipeline", triggered_by="reviewer-a",
                              trigger="request:q1")


@pytest.fixture
def signer(tmp_path):
    return load_or_create_signer("KDSEC_TEST_UNSET_SIGNING_KEY", tmp_path / "signing.pem")


def test_a_signed_verdict_verifies_and_says_who_triggered(signer):
    value = attestation.sign(VERDICT, signer)
    found = attestation.verify(value, signer.public, **BOUND)
    assert found.passed and found.triggered_by == "reviewer-a" and found.signer == signer.key_id


def test_a_failing_gate_is_not_a_pass_whatever_the_verdict_field_says(signer):
    value = attestation.sign(replace(VERDICT, gates={"accuracy": "pass", "he": "fail"}), signer)
    assert not attestation.verify(value, signer.public, **BOUND).passed


@pytest.mark.parametrize("field,other", [("version", "4"), ("source", "models:/m-other"), ("run_id", "r2"),
                                         ("model", "another-model")])
def test_an_attestation_copied_to_another_version_is_refused(signer, field, other):
    value = attestation.sign(VERDICT, signer)
    with pytest.raises(IntegrityError, match=f"speaks of {field}"):
        attestation.verify(value, signer.public, **{**BOUND, field: other})


def test_an_edited_payload_another_key_and_garbage_are_refused_in_one_line(signer, tmp_path):
    value = attestation.sign(replace(VERDICT, gates={"accuracy": "fail"}, verdict="fail"), signer)
    payload, signature = value.split(".")
    edited = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edited.update(verdict="pass", gates={"accuracy": "pass"})
    forged = base64.urlsafe_b64encode(json.dumps(edited).encode()).decode().rstrip("=") + "." + signature
    other = load_or_create_signer("KDSEC_TEST_UNSET_SIGNING_KEY", tmp_path / "other.pem")
    cases = {forged: "not signed by the trusted pipeline key",
             attestation.sign(VERDICT, other): "not signed by the trusted pipeline key",
             "": "carries no verdict attestation", "pass": "malformed", "a.b.c": "malformed",
             "!!!.???": "bad encoding", "x" * (attestation.MAX_TAG_BYTES + 1): "malformed"}
    for value, message in cases.items():
        with pytest.raises(IntegrityError, match=message) as caught:
            attestation.verify(value, signer.public, **BOUND)
        assert "\n" not in str(caught.value) and "version 3 of 'kdsec-student'" in str(caught.value)


def test_the_trusted_key_comes_from_the_environment_as_pem_or_path_else_the_local_signer(tmp_path, monkeypatch):
    key = generate_key_file(tmp_path / "team.pem", "signing")
    pub = public_key_path(key)
    monkeypatch.setenv(attestation.PUBLIC_KEY_ENV, str(pub))
    from_path = attestation.trusted_key()
    monkeypatch.setenv(attestation.PUBLIC_KEY_ENV, pub.read_text())
    assert attestation.trusted_key().public_numbers() == from_path.public_numbers()
    monkeypatch.setenv(attestation.PUBLIC_KEY_ENV, "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----")
    with pytest.raises(KeyMaterialError, match="holds no PEM public key"):
        attestation.trusted_key()
    monkeypatch.delenv(attestation.PUBLIC_KEY_ENV)
    assert attestation.trusted_key(None, key).public_numbers() == from_path.public_numbers()  # the .pub beside it
    with pytest.raises(KeyMaterialError, match=attestation.PUBLIC_KEY_ENV):
        attestation.trusted_key(None, tmp_path / "missing.pem")
