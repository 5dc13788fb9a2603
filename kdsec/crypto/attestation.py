"""Verdict attestations: the pipeline's signed statement of what it decided about one registered
version, the only thing that lets a version be promoted.

Version tags (``gates``, ``gate.*``, ``verdict``) are for people to read; anyone who may edit the
registered model could write them. The attestation binds the verdict to the version it speaks of
(model name, version number, its source and run), to the ``audit.json`` a reviewer reads (its
SHA-256), to each gate's verdict and to who launched and who triggered the run, under an ECDSA
P-256 signature by the pipeline's signing key (the key that signs its packages). ``kdsec review
approve``, the pipeline's own promotion and the team server's plugin (``kdsec.mlflow_auth``) all
verify it against a trusted public key before an alias moves.

The tag value is ``base64url(payload) "." base64url(signature)``, payload canonical JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kdsec.crypto.keys import (PublicKey, Signer, load_public_key, parse_private_key, public_key_id, public_key_path,
                               verify_signature)
from kdsec.errors import IntegrityError, KeyMaterialError

TAG = "kdsec.attestation"  # the version tag that carries the attestation
SCHEMA = "kdsec-verdict/1"
PUBLIC_KEY_ENV = "KDSEC_VERDICT_PUBLIC_KEY"  # path of the trusted public key (PEM) where the signer is elsewhere
MAX_TAG_BYTES = 16 * 1024  # an attestation is ~1 KiB; anything far larger is not one


# Run requests (see ``kdsec.tracking.create_run_request``): tags on a run in the experiment, written
# once by the asker (the team server's plugin checks who), claimed once by the pipeline.
TRIGGERED_BY = "kdsec.triggered_by"
REQUEST_PREFIX = "kdsec.request."
REQUEST_CONFIG = "kdsec.request.config_path"
REQUEST_OVERRIDES = "kdsec.request.overrides"
REQUEST_DEPLOYMENT = "kdsec.request.deployment"
CLAIMED_BY = "kdsec.request.claimed_by"


@dataclass(frozen=True)
class Verdict:
    """What the pipeline attests about one registered version."""

    model: str
    version: str
    source: str  # the version's model source (models:/<id> or runs:/...)
    run_id: str  # the run that logged the model (the version's run)
    pipeline_run: str  # the kd-pipeline parent run (its report, summary.json, audit.json)
    audit_sha256: str
    model_sha256: str  # the registered model's files (weights, serving settings, code), see ``tree_sha256``
    gates: dict[str, str]  # gate name -> pass | fail
    verdict: str  # pass | fail: every gate passed
    launched_by: str  # the identity that registered the version
    triggered_by: str | None  # who asked for the run (authenticated), "schedule:<deployment>", or None: unknown
    trigger: str  # how the run was started: request:<run id> | schedule | direct | deployment
    signer: str = ""  # the signing key's id (filled in by ``sign``)
    schema: str = SCHEMA

    @property
    def passed(self) -> bool:
        return self.verdict == "pass" and bool(self.gates) and all(v == "pass" for v in self.gates.values())


def sign(verdict: Verdict, signer: Signer) -> str:
    """The tag value: the verdict (with the signer's key id) and its signature."""
    payload = json.dumps(asdict(verdict) | {"signer": signer.key_id}, sort_keys=True, separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(signer.sign(payload))}"


def verify(value: str | None, trusted: PublicKey, *, model: str, version: str, source: str, run_id: str) -> Verdict:
    """The attested verdict of version ``version`` of ``model``, whose registry record has ``source``
    and ``run_id``; an IntegrityError (one line naming the version and the failed check) when there
    is none, it is malformed, its signature does not verify against ``trusted``, or it speaks of
    another version."""
    where = f"version {version} of '{model}'"
    if not value:
        raise IntegrityError(f"{where} carries no verdict attestation ({TAG}): only a version that the pipeline "
                             "registered and attested can be promoted; run the pipeline to produce one")
    if len(value) > MAX_TAG_BYTES or value.count(".") != 1:
        raise IntegrityError(f"{where}: its {TAG} tag is not an attestation (malformed)")
    encoded, signature = value.split(".")
    try:
        payload, signature_bytes = _unb64(encoded), _unb64(signature)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"{where}: its {TAG} tag is not an attestation (bad encoding)") from None
    if not verify_signature(trusted, signature_bytes, payload):
        raise IntegrityError(f"{where}: its verdict attestation is not signed by the trusted pipeline key "
                             f"{public_key_id(trusted)} (forged or altered); only the pipeline's own verdict counts")
    try:
        fields = json.loads(payload)
        found = Verdict(**fields)
    except (ValueError, TypeError):
        raise IntegrityError(f"{where}: its verdict attestation has an unknown layout") from None
    if found.schema != SCHEMA:
        raise IntegrityError(f"{where}: verdict attestation schema '{found.schema}', expected '{SCHEMA}'")
    bound = {"model": model, "version": str(version), "source": source, "run_id": run_id}
    for key, expected in bound.items():
        if str(getattr(found, key)) != str(expected):
            raise IntegrityError(f"{where}: its verdict attestation speaks of {key} '{getattr(found, key)}', not "
                                 f"'{expected}' (copied from another version)")
    return found


def configured_key() -> PublicKey | None:
    """``$KDSEC_VERDICT_PUBLIC_KEY``: a PEM public key, or the path of one (None when unset)."""
    value = os.environ.get(PUBLIC_KEY_ENV, "").strip()
    if not value:
        return None
    if not value.startswith("-----BEGIN"):
        return load_public_key(value)
    try:
        key = serialization.load_pem_public_key(value.encode())
    except ValueError:
        raise KeyMaterialError(f"${PUBLIC_KEY_ENV} holds no PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"${PUBLIC_KEY_ENV} is not an ECDSA P-256 public key")
    return key


def tree_sha256(root: Path) -> str:
    """One SHA-256 over every file under ``root``: relative path, size and content, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def refusal(verdict: Verdict, username: str, four_eyes: bool, launched_by_tag: str | None = None) -> str | None:
    """Why ``username`` may not promote the version ``verdict`` speaks of (one line naming the version,
    the failed check and what would pass it), or None: its gates must have passed and, with
    ``four_eyes``, the run must have a known trigger that is not ``username``, who did not launch
    it either (``launched_by_tag``: the version's ``kdsec.launched_by``, if it says otherwise)."""
    version = verdict.version
    if not verdict.passed:
        failed = ", ".join(sorted(gate for gate, result in verdict.gates.items() if result != "pass")) or "none"
        return (f"version {version} did not pass its gates (the pipeline attested: {failed} failed); it cannot "
                "be promoted — a run whose gates pass can")
    if not four_eyes:
        return None
    if verdict.triggered_by is None:
        return (f"four-eyes: nobody is known to have triggered the run behind version {version} (started as "
                f"'{verdict.trigger}' without an authenticated request), so nobody can be the second pair of eyes; "
                "trigger runs with kdsec trigger")
    if username in (verdict.launched_by, verdict.triggered_by, launched_by_tag):
        role = "triggered" if username == verdict.triggered_by else "launched"
        return f"four-eyes: '{username}' {role} the run behind version {version} and cannot approve it; another reviewer must"
    return None


def trusted_key(signing_env: str | None = None, signing_file: str | Path | None = None) -> PublicKey:
    """The public key verdicts must verify against: ``$KDSEC_VERDICT_PUBLIC_KEY`` (PEM, or a PEM file) when
    set, else the public half of the configured signing key (``$signing_env`` or the ``.pub`` beside
    ``signing_file``, as the pipeline on this machine signs). Nothing is created."""
    if configured := configured_key():
        return configured
    if signing_env and (text := os.environ.get(signing_env)):
        return parse_private_key(text.encode(), f"${signing_env}").public_key()
    if signing_file and os.path.lexists(public_key_path(Path(signing_file))):
        return load_public_key(public_key_path(Path(signing_file)))
    raise KeyMaterialError(f"no trusted key to check verdict attestations: set {PUBLIC_KEY_ENV} to the pipeline's "
                           "public key (PEM; the team stack writes it to .stack/keys/pipeline-signing.pem.pub)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):  # the decoder would skip foreign characters silently
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
