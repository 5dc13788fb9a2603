"""The protected model package: envelope-encrypted files and an Ed25519-signed manifest.

Layout of a package folder::

    manifest.json               {"payload": {...}, "signature": base64 Ed25519 over the canonical payload}
    weights.safetensors.enc     AES-256-GCM under a fresh random data key (one per file)
    model.json                  plaintext metadata (format, classes), covered by the manifest

The payload lists the SHA-256 and size of every other file, the model name and version, each
data key wrapped by the key-encryption key (KEK) of a ``KeyProvider``, and the signer's public
key. The associated data of every encrypted file binds the model name, version, file name and
``content_digest`` (the digest of the payload's plaintext file list), so a file cannot be moved
to another model, version or package. Opening checks, in order: signature (against a trusted
public key), every digest and size, the KEK, then decrypts. Rotation re-wraps data keys under a
new KEK and re-signs; the encrypted files are not touched. Every write is atomic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kdsec.crypto.at_rest import KEY_BYTES, NONCE_BYTES, ModelKey
from kdsec.crypto.keys import KeyProvider, LocalKeyProvider, Signer, public_key_id, raw_public, verify_signature
from kdsec.errors import IntegrityError, KdsecError
from kdsec.fileio import write_atomic

FORMAT = "kdsec-package/1"
MANIFEST = "manifest.json"


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _aad(name: str, version: str, content_digest: str, file_name: str) -> bytes:
    return f"{FORMAT}|{name}|{version}|{content_digest}|{file_name}".encode()


def _wrap_context(name: str, version: str, file_name: str) -> bytes:
    return f"{name}|{version}|{file_name}".encode()


@dataclass(frozen=True)
class PackageInfo:
    path: str
    model: str
    version: str
    files: dict[str, int]  # name -> bytes on disk
    kek_ids: list[str]
    signer_key_id: str


def create_package(destination: Path, encrypted: dict[str, bytes], plaintext: dict[str, bytes], *, name: str,
                   version: str, provider: KeyProvider, signer: Signer) -> PackageInfo:
    """Write a signed package with ``encrypted`` files (name → plaintext bytes) sealed under fresh
    data keys and ``plaintext`` files stored as they are. Nothing appears at ``destination``
    unless everything was written."""
    if destination.exists():
        raise KdsecError(f"'{destination}' already exists; choose another --out or remove it")
    plain_list = {f: {"sha256": _sha256(data), "bytes": len(data)} for f, data in sorted(encrypted.items())}
    content_digest = _sha256(_canonical(plain_list))
    files: dict[str, dict] = {}
    blobs: dict[str, bytes] = {}
    for file_name, data in sorted(encrypted.items()):
        data_key, nonce = AESGCM.generate_key(bit_length=8 * KEY_BYTES), os.urandom(NONCE_BYTES)
        blob = nonce + AESGCM(data_key).encrypt(nonce, data, _aad(name, version, content_digest, file_name))
        stored = f"{file_name}.enc"
        blobs[stored] = blob
        files[stored] = {"sha256": _sha256(blob), "bytes": len(blob), "encrypted": True, "plaintext": file_name,
                         "data_key": provider.wrap(data_key, _wrap_context(name, version, file_name))}
    for file_name, data in sorted(plaintext.items()):
        blobs[file_name] = data
        files[file_name] = {"sha256": _sha256(data), "bytes": len(data), "encrypted": False}
    payload = {"format": FORMAT, "model": {"name": name, "version": str(version)},
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "content": plain_list, "content_digest": content_digest, "files": files,
               "signer": {"algorithm": "Ed25519", "public_key": raw_public(signer.public), "key_id": signer.key_id}}
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        for stored, blob in blobs.items():
            (staging / stored).write_bytes(blob)
        (staging / MANIFEST).write_bytes(_signed(payload, signer))
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _info(destination, payload)


def _signed(payload: dict, signer: Signer) -> bytes:
    signature = base64.b64encode(signer.sign(_canonical(payload))).decode()
    return json.dumps({"payload": payload, "signature": signature}, indent=2, sort_keys=True).encode()


def _info(path: Path, payload: dict) -> PackageInfo:
    return PackageInfo(str(path), payload["model"]["name"], payload["model"]["version"],
                       {name: entry["bytes"] for name, entry in payload["files"].items()},
                       sorted({entry["data_key"]["key_id"] for entry in payload["files"].values() if entry["encrypted"]}),
                       payload["signer"]["key_id"])


def read_verified(package: Path, trusted: Ed25519PublicKey) -> tuple[dict, dict[str, bytes]]:
    """Signature first, then every file's size and digest; returns the verified payload and the
    bytes that were checked (later steps use these, never a second read of the files).
    Raises ``IntegrityError`` with one line naming the first problem."""
    manifest_path = package / MANIFEST
    if not package.is_dir():
        raise IntegrityError(f"'{package}' is not a kdsec package folder")
    if not manifest_path.is_file():
        raise IntegrityError(f"'{package}' has no {MANIFEST}: not a signed kdsec package")
    try:
        document = json.loads(manifest_path.read_bytes())
        payload, signature_text = document["payload"], document.get("signature")
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{manifest_path} is truncated or not a kdsec manifest") from None
    if not signature_text:
        raise IntegrityError(f"{manifest_path} is unsigned (no signature): refusing to load it")
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except ValueError:
        raise IntegrityError(f"{manifest_path} has a malformed signature") from None
    if not verify_signature(trusted, signature, _canonical(payload)):
        claimed = payload.get("signer", {}).get("key_id", "?")
        raise IntegrityError(f"invalid signature on {manifest_path}: the manifest was modified or signed by "
                             f"another key (claims {claimed}, trusted key is {public_key_id(trusted)})")
    if payload.get("format") != FORMAT:
        raise IntegrityError(f"unsupported package format {payload.get('format')!r} (expected {FORMAT})")
    blobs: dict[str, bytes] = {}
    for name, entry in payload["files"].items():
        path = package / name
        if not path.is_file():
            raise IntegrityError(f"'{path}' is missing from the package")
        data = blobs[name] = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise IntegrityError(f"'{path}' is truncated or padded: {len(data)} bytes, the manifest says {entry['bytes']}")
        if _sha256(data) != entry["sha256"]:
            raise IntegrityError(f"'{path}' does not match its SHA-256 in the signed manifest: tampered ciphertext")
    return payload, blobs


def verify_package(package: Path, trusted: Ed25519PublicKey) -> dict:
    """The verified payload (see ``read_verified``)."""
    return read_verified(package, trusted)[0]


def open_package(package: Path, provider: KeyProvider, trusted: Ed25519PublicKey,
                 verified: tuple[dict, dict[str, bytes]] | None = None) -> dict[str, bytes]:
    """Verify (unless given ``read_verified``'s result), unwrap and decrypt: every file of the
    package as plaintext bytes, by its original name."""
    payload, blobs = verified or read_verified(package, trusted)
    name, version = payload["model"]["name"], payload["model"]["version"]
    out: dict[str, bytes] = {}
    for stored, entry in payload["files"].items():
        data = blobs[stored]
        if not entry["encrypted"]:
            out[stored] = data
            continue
        plain_name = entry["plaintext"]
        data_key = provider.unwrap(entry["data_key"], _wrap_context(name, version, plain_name))
        try:
            plain = AESGCM(data_key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:],
                                             _aad(name, version, payload["content_digest"], plain_name))
        except InvalidTag:
            raise IntegrityError(f"'{package / stored}' failed authentication: tampered or moved ciphertext") from None
        if _sha256(plain) != payload["content"][plain_name]["sha256"]:
            raise IntegrityError(f"'{plain_name}' decrypted to bytes that do not match the signed manifest")
        out[plain_name] = plain
    return out


def rotate_package_key(package: Path, old: KeyProvider, new: KeyProvider, signer: Signer,
                       trusted: Ed25519PublicKey) -> PackageInfo:
    """Re-wrap every data key under ``new`` and re-sign; encrypted files stay byte-identical."""
    payload = verify_package(package, trusted)
    name, version = payload["model"]["name"], payload["model"]["version"]
    for entry in payload["files"].values():
        if entry["encrypted"]:
            context = _wrap_context(name, version, entry["plaintext"])
            entry["data_key"] = new.wrap(old.unwrap(entry["data_key"], context), context)
    payload["signer"] = {"algorithm": "Ed25519", "public_key": raw_public(signer.public), "key_id": signer.key_id}
    payload["rotated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_atomic(package / MANIFEST, _signed(payload, signer))
    return _info(package, payload)


def decrypt_package_to(package: Path, provider: KeyProvider, trusted: Ed25519PublicKey, file_name: str,
                       destination: Path) -> Path:
    """Write one decrypted file atomically (0600): all checks pass first, or nothing is written."""
    files = open_package(package, provider, trusted)
    if file_name not in files:
        raise KdsecError(f"the package has no file '{file_name}' (it has: {', '.join(sorted(files))})")
    return write_atomic(destination, files[file_name], mode=0o600)


@dataclass(frozen=True)
class AtRestResult:
    package_path: str
    package_bytes: int
    encrypted_bytes: int
    key_source: str
    kek_id: str
    signer_key_id: str
    roundtrip_exact: bool
    tamper_rejected: bool
    wrong_key_rejected: bool
    manifest_tamper_rejected: bool
    unsigned_rejected: bool

    @property
    def passed(self) -> bool:
        return all((self.roundtrip_exact, self.tamper_rejected, self.wrong_key_rejected,
                    self.manifest_tamper_rejected, self.unsigned_rejected))


def protect_and_verify(destination: Path, encrypted: dict[str, bytes], plaintext: dict[str, bytes], *, name: str,
                       version: str, provider: KeyProvider, signer: Signer, key_source: str) -> AtRestResult:
    """Create the package, then prove its protection on scratch copies: it opens bit-exact with the
    right keys; a flipped ciphertext byte, a different KEK, an edited manifest and a stripped
    signature are each rejected."""
    info = create_package(destination, encrypted, plaintext, name=name, version=version, provider=provider,
                          signer=signer)
    opened = open_package(destination, provider, signer.public)
    roundtrip = all(opened[f] == data for f, data in {**encrypted, **plaintext}.items())
    stored = next(f for f in info.files if f.endswith(".enc"))

    def flip_ciphertext(copy: Path) -> None:
        blob = bytearray((copy / stored).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        (copy / stored).write_bytes(bytes(blob))

    def edit_manifest(copy: Path) -> None:
        document = json.loads((copy / MANIFEST).read_bytes())
        document["payload"]["model"]["version"] += "-forged"
        (copy / MANIFEST).write_text(json.dumps(document))

    def strip_signature(copy: Path) -> None:
        document = json.loads((copy / MANIFEST).read_bytes())
        document["signature"] = ""
        (copy / MANIFEST).write_text(json.dumps(document))

    stranger = LocalKeyProvider(ModelKey(os.urandom(KEY_BYTES), "random:test"))
    return AtRestResult(
        package_path=str(destination), package_bytes=sum(info.files.values()) + (destination / MANIFEST).stat().st_size,
        encrypted_bytes=info.files[stored], key_source=key_source, kek_id=provider.key_id,
        signer_key_id=signer.key_id, roundtrip_exact=roundtrip,
        tamper_rejected=_rejects(destination, flip_ciphertext, provider, signer.public),
        wrong_key_rejected=_rejects(destination, None, stranger, signer.public),
        manifest_tamper_rejected=_rejects(destination, edit_manifest, provider, signer.public),
        unsigned_rejected=_rejects(destination, strip_signature, provider, signer.public),
    )


def _rejects(package: Path, damage, provider: KeyProvider, trusted: Ed25519PublicKey) -> bool:
    with tempfile.TemporaryDirectory(prefix="kdsec-tamper-") as scratch:
        copy = Path(scratch) / "package"
        shutil.copytree(package, copy)
        if damage is not None:
            damage(copy)
        try:
            open_package(copy, provider, trusted)
        except IntegrityError:
            return True
    return False
