"""The protected model package: envelope-encrypted files, a signed manifest, and the OpenSSF
model signature of the whole folder.

Layout of a package folder::

    manifest.json               {"payload": {...}, "signature": base64 ECDSA P-256 over the canonical payload}
    weights.safetensors.enc     AES-256-GCM under a fresh random data key (one per file)
    model.json                  plaintext metadata (format, classes), covered by the manifest
    model.sig                   OpenSSF model-signing bundle (same key) over every other file

The payload lists the SHA-256 and size of every other file, the model name and version, each
data key wrapped by the key-encryption key (KEK) of a ``KeyProvider``, and the signer's public
key. The associated data of every encrypted file binds the model name, version, file name and
``content_digest`` (the digest of the payload's plaintext file list), so a file cannot be moved
to another model, version or package. Opening checks, in order: the folder (regular files only,
no links), the manifest's size and JSON, the signature (against a trusted public key), the
manifest's shape (a typed model: plain file names only, bounded sizes), every file's size (from
``fstat``, before reading) and digest, the KEK, then decrypts. Rotation re-wraps data keys under
a new KEK and re-signs; the encrypted files are not touched. Every write goes through
``kdsec.fileio.write_atomic``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from kdsec.crypto.model_key import KEY_BYTES, NONCE_BYTES, ModelKey
from kdsec.crypto.keys import (SIGNING_ALGORITHM, KeyProvider, LocalKeyProvider, PublicKey, Signer, public_key_id,
                               raw_public, verify_signature)
from kdsec.crypto.model_signature import SIGNATURE, sign_folder, verify_folder
from kdsec.errors import IntegrityError, KdsecError
from kdsec.fileio import PRIVATE, PUBLIC, read_bounded, write_atomic

FORMAT = "kdsec-package/1"
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 1 << 20  # a manifest lists a handful of files: 1 MiB is generous
FILE_LIMIT = 1 << 32  # 4 GiB per packaged file
MAX_ENTRIES = 256  # files in a package folder


# --- the manifest, typed: anything else is refused before it is used -----------------------------

# A package file name is a plain name inside the package folder: no separators, no "..", not hidden.
PlainName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Size = Annotated[int, Field(ge=0, le=FILE_LIMIT)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class WrappedKey(_Strict):
    provider: Text
    key_id: Text
    nonce: Annotated[str, StringConstraints(max_length=64)]
    wrapped: Annotated[str, StringConstraints(max_length=256)]


class ContentEntry(_Strict):
    sha256: Digest
    bytes: Size


class FileEntry(ContentEntry):
    encrypted: bool
    plaintext: PlainName | None = None
    data_key: WrappedKey | None = None

    @model_validator(mode="after")
    def _encrypted_files_name_their_key(self) -> FileEntry:
        if self.encrypted != (self.plaintext is not None and self.data_key is not None):
            raise ValueError("an encrypted file names its plaintext and data key; a plain file names neither")
        return self


class ModelId(_Strict):
    name: Text
    version: Text


class SignerInfo(_Strict):
    algorithm: Literal["ECDSA-P256-SHA256", "Ed25519"]
    public_key: Annotated[str, StringConstraints(max_length=512)]
    key_id: Text


class Payload(_Strict):
    format: Literal["kdsec-package/1"]
    model: ModelId
    created: Text
    rotated: Text | None = None
    content: dict[PlainName, ContentEntry] = Field(max_length=MAX_ENTRIES)
    content_digest: Digest
    files: dict[PlainName, FileEntry] = Field(min_length=1, max_length=MAX_ENTRIES)
    signer: SignerInfo

    @model_validator(mode="after")
    def _names_are_consistent(self) -> Payload:
        reserved = {MANIFEST, SIGNATURE} & set(self.files)
        if reserved:
            raise ValueError(f"lists the reserved name {sorted(reserved)[0]!r} as a file")
        sealed = [entry.plaintext for entry in self.files.values() if entry.encrypted]
        if sorted(sealed) != sorted(self.content):
            raise ValueError("the encrypted files and the content list do not name the same plaintexts, once each")
        return self


class Document(_Strict):
    payload: dict
    signature: Annotated[str, StringConstraints(max_length=1024)]


def _first_problem(error: ValidationError) -> str:
    """The first validation problem, on one short line whatever the (attacker's) keys contain."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "<top>"
    text = f"{where}: {first['msg']}".encode("unicode_escape").decode("ascii")
    return text if len(text) <= 160 else text[:157] + "..."


# --- writing --------------------------------------------------------------------------------------


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


def _signer_info(signer: Signer) -> dict:
    return {"algorithm": SIGNING_ALGORITHM, "public_key": raw_public(signer.public), "key_id": signer.key_id}


def create_package(destination: Path, encrypted: dict[str, bytes], plaintext: dict[str, bytes], *, name: str,
                   version: str, provider: KeyProvider, signer: Signer) -> PackageInfo:
    """Write a signed package with ``encrypted`` files (name → plaintext bytes) sealed under fresh
    data keys and ``plaintext`` files stored as they are, plus the OpenSSF model signature of the
    folder. Nothing appears at ``destination`` unless everything was written."""
    if os.path.lexists(destination):
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
               "content": plain_list, "content_digest": content_digest, "files": files, "signer": _signer_info(signer)}
    try:
        Payload.model_validate(payload)  # what we write is what we accept when reading
    except ValidationError as exc:
        raise KdsecError(f"cannot package these files: {_first_problem(exc)}") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    # A private (0700, random) staging folder; the package inside it carries the final name, so the
    # OpenSSF signature names the model as it will be found.
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        folder = staging / destination.name
        folder.mkdir(mode=0o700)
        for stored, blob in blobs.items():
            write_atomic(folder / stored, blob, mode=PUBLIC, overwrite=False)
        write_atomic(folder / MANIFEST, _signed(payload, signer), mode=PUBLIC, overwrite=False)
        sign_folder(folder, signer.private)
        os.rename(folder, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _info(destination, payload)


def _signed(payload: dict, signer: Signer) -> bytes:
    signature = base64.b64encode(signer.sign(_canonical(payload))).decode()
    return json.dumps({"payload": payload, "signature": signature}, indent=2, sort_keys=True).encode()


def _info(path: Path, payload: dict) -> PackageInfo:
    return PackageInfo(str(path), payload["model"]["name"], payload["model"]["version"],
                       {name: entry["bytes"] for name, entry in payload["files"].items()},
                       sorted({entry["data_key"]["key_id"] for entry in payload["files"].values() if entry["encrypted"]}),
                       payload["signer"]["key_id"])


# --- reading --------------------------------------------------------------------------------------


def _check_folder(package: Path) -> None:
    """A real folder of regular files: no links, no sub-folders, a bounded number of entries."""
    if package.is_symlink() or not package.is_dir():
        raise IntegrityError(f"'{package}' is not a kdsec package folder")
    with os.scandir(package) as entries:
        for count, entry in enumerate(entries):
            if count >= MAX_ENTRIES:
                raise IntegrityError(f"'{package}' holds more than {MAX_ENTRIES} entries: not a kdsec package")
            if entry.is_symlink():
                raise IntegrityError(f"'{package / entry.name}' is a symbolic link: links in a package are refused")
            if not entry.is_file(follow_symlinks=False):
                raise IntegrityError(f"'{package / entry.name}' is not a regular file: a package holds files only")


def _read_manifest(package: Path) -> tuple[dict, bytes]:
    """The raw payload and its signature, parsed from a bounded, well-formed manifest."""
    manifest_path = package / MANIFEST
    if not os.path.lexists(manifest_path):
        raise IntegrityError(f"'{package}' has no {MANIFEST}: not a signed kdsec package")
    data = read_bounded(manifest_path, MANIFEST_LIMIT, "manifest", error=IntegrityError)
    try:
        document = Document.model_validate(json.loads(data))
    except (ValueError, RecursionError, TypeError, ValidationError):
        # ValueError covers bad JSON, bad UTF-8 and numbers too long to convert; RecursionError deep nesting.
        raise IntegrityError(f"{manifest_path} is truncated or not a kdsec manifest") from None
    if not document.signature:
        raise IntegrityError(f"{manifest_path} is unsigned (no signature): refusing to load it")
    try:
        signature = base64.b64decode(document.signature, validate=True)
    except ValueError:
        raise IntegrityError(f"{manifest_path} has a malformed signature") from None
    return document.payload, signature


def read_verified(package: Path, trusted: PublicKey) -> tuple[dict, dict[str, bytes]]:
    """Signature first, then the manifest's shape, then every file's size and digest; returns the
    verified payload and the bytes that were checked (later steps use these, never a second
    read of the files). Raises ``IntegrityError`` with one line naming the first problem."""
    _check_folder(package)
    raw, signature = _read_manifest(package)
    manifest_path = package / MANIFEST
    try:
        canonical = _canonical(raw)
    except (ValueError, RecursionError, TypeError):
        raise IntegrityError(f"{manifest_path} is not a kdsec manifest") from None
    if not verify_signature(trusted, signature, canonical):
        claimed = raw.get("signer", {}).get("key_id", "?") if isinstance(raw.get("signer"), dict) else "?"
        raise IntegrityError(f"invalid signature on {manifest_path}: the manifest was modified or signed by "
                             f"another key (claims {str(claimed)[:32]}, trusted key is {public_key_id(trusted)})")
    if raw.get("format") != FORMAT:
        raise IntegrityError(f"unsupported package format {str(raw.get('format'))[:40]!r} (expected {FORMAT})")
    try:
        payload = Payload.model_validate(raw)
    except ValidationError as exc:
        raise IntegrityError(f"{manifest_path} is signed but malformed ({_first_problem(exc)})") from None
    blobs: dict[str, bytes] = {}
    for name, entry in payload.files.items():
        path = package / name
        if not os.path.lexists(path):
            raise IntegrityError(f"'{path}' is missing from the package")
        data = blobs[name] = read_bounded(path, FILE_LIMIT, "package file", expected=entry.bytes, error=IntegrityError)
        if _sha256(data) != entry.sha256:
            raise IntegrityError(f"'{path}' does not match its SHA-256 in the signed manifest: tampered ciphertext")
    return raw, blobs


def verify_package(package: Path, trusted: PublicKey) -> dict:
    """The verified payload (see ``read_verified``)."""
    return read_verified(package, trusted)[0]


def verify_model_signature(package: Path, trusted: PublicKey) -> None:
    """The OpenSSF model signature (``model.sig``) over the whole folder, by the same key."""
    _check_folder(package)
    verify_folder(package, trusted)


def open_package(package: Path, provider: KeyProvider, trusted: PublicKey,
                 verified: tuple[dict, dict[str, bytes]] | None = None) -> dict[str, bytes]:
    """Verify (unless given ``read_verified``'s result), unwrap and decrypt: every file of the
    package as plaintext bytes, by its original name."""
    raw, blobs = verified or read_verified(package, trusted)
    payload = Payload.model_validate(raw)
    name, version = payload.model.name, payload.model.version
    out: dict[str, bytes] = {}
    for stored, entry in payload.files.items():
        data = blobs[stored]
        if not entry.encrypted:
            out[stored] = data
            continue
        plain_name = entry.plaintext
        data_key = provider.unwrap(entry.data_key.model_dump(), _wrap_context(name, version, plain_name))
        try:
            plain = AESGCM(data_key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:],
                                             _aad(name, version, payload.content_digest, plain_name))
        except (InvalidTag, ValueError):
            raise IntegrityError(f"'{package / stored}' failed authentication: tampered or moved ciphertext") from None
        if _sha256(plain) != payload.content[plain_name].sha256:
            raise IntegrityError(f"'{plain_name}' decrypted to bytes that do not match the signed manifest")
        out[plain_name] = plain
    return out


def rotate_package_key(package: Path, old: KeyProvider, new: KeyProvider, signer: Signer,
                       trusted: PublicKey) -> PackageInfo:
    """Re-wrap every data key under ``new``, re-sign the manifest and the folder; encrypted files
    stay byte-identical. The manifest and signature are replaced atomically, never through a link."""
    payload = verify_package(package, trusted)
    name, version = payload["model"]["name"], payload["model"]["version"]
    for entry in payload["files"].values():
        if entry["encrypted"]:
            context = _wrap_context(name, version, entry["plaintext"])
            entry["data_key"] = new.wrap(old.unwrap(entry["data_key"], context), context)
    payload["signer"] = _signer_info(signer)
    payload["rotated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_atomic(package / MANIFEST, _signed(payload, signer), mode=PUBLIC)
    sign_folder(package, signer.private)
    return _info(package, payload)


def decrypt_package_to(package: Path, provider: KeyProvider, trusted: PublicKey, file_name: str,
                       destination: Path, overwrite: bool = False) -> Path:
    """Write one decrypted file atomically (0600): all checks pass first, or nothing is written.
    An existing ``destination`` is refused unless ``overwrite``; a directory always."""
    if destination.is_dir():
        raise KdsecError(f"--out '{destination}' is a directory; give a file path for the decrypted weights")
    if not overwrite and os.path.lexists(destination):
        raise KdsecError(f"--out '{destination}' already exists; choose another path or pass --force to replace it")
    files = open_package(package, provider, trusted)
    if file_name not in files:
        raise KdsecError(f"the package has no file '{file_name}' (it has: {', '.join(sorted(files))})")
    return write_atomic(destination, files[file_name], mode=PRIVATE, overwrite=overwrite)


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
    model_signature_verified: bool  # the OpenSSF signature holds on the package and fails on a tampered copy

    @property
    def passed(self) -> bool:
        return all((self.roundtrip_exact, self.tamper_rejected, self.wrong_key_rejected,
                    self.manifest_tamper_rejected, self.unsigned_rejected, self.model_signature_verified))

    def metrics(self) -> dict[str, float]:
        """Sizes and proofs as numbers (a proof is 1.0 when it held)."""
        return {key: float(value) for key, value in asdict(self).items() if isinstance(value, (bool, int, float))}

    def labels(self) -> dict[str, str]:
        """Where the package is and which keys protect it (ids and sources, never key material)."""
        return {key: value for key, value in asdict(self).items() if isinstance(value, str)}


def protect_and_verify(destination: Path, encrypted: dict[str, bytes], plaintext: dict[str, bytes], *, name: str,
                       version: str, provider: KeyProvider, signer: Signer, key_source: str) -> AtRestResult:
    """Create the package, then prove its protection on scratch copies: it opens bit-exact with the
    right keys; a flipped ciphertext byte, a different KEK, an edited manifest and a stripped
    signature are each rejected; its OpenSSF model signature verifies, and fails on a tampered copy."""
    info = create_package(destination, encrypted, plaintext, name=name, version=version, provider=provider,
                          signer=signer)
    opened = open_package(destination, provider, signer.public)
    roundtrip = all(opened[f] == data for f, data in {**encrypted, **plaintext}.items())
    stored = next(f for f in info.files if f.endswith(".enc"))

    def flip_ciphertext(copy: Path) -> None:
        blob = bytearray((copy / stored).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        write_atomic(copy / stored, bytes(blob))

    def edit_manifest(copy: Path) -> None:
        document = json.loads((copy / MANIFEST).read_bytes())
        document["payload"]["model"]["version"] += "-forged"
        write_atomic(copy / MANIFEST, json.dumps(document))

    def strip_signature(copy: Path) -> None:
        document = json.loads((copy / MANIFEST).read_bytes())
        document["signature"] = ""
        write_atomic(copy / MANIFEST, json.dumps(document))

    stranger = LocalKeyProvider(ModelKey(os.urandom(KEY_BYTES), "random:test"))
    return AtRestResult(
        package_path=str(destination), package_bytes=sum(info.files.values()) + sum((destination / f).stat().st_size for f in (MANIFEST, SIGNATURE)),
        encrypted_bytes=info.files[stored], key_source=key_source, kek_id=provider.key_id,
        signer_key_id=signer.key_id, roundtrip_exact=roundtrip,
        tamper_rejected=_rejects(destination, flip_ciphertext, provider, signer.public),
        wrong_key_rejected=_rejects(destination, None, stranger, signer.public),
        manifest_tamper_rejected=_rejects(destination, edit_manifest, provider, signer.public),
        unsigned_rejected=_rejects(destination, strip_signature, provider, signer.public),
        model_signature_verified=_model_signature_holds(destination, flip_ciphertext, signer.public),
    )


def _model_signature_holds(package: Path, damage, trusted: PublicKey) -> bool:
    try:
        verify_model_signature(package, trusted)
    except IntegrityError:
        return False
    with tempfile.TemporaryDirectory(prefix="kdsec-tamper-") as scratch:
        copy = Path(scratch) / package.name
        shutil.copytree(package, copy)
        damage(copy)
        try:
            verify_model_signature(copy, trusted)
        except IntegrityError:
            return True
    return False


def _rejects(package: Path, damage, provider: KeyProvider, trusted: PublicKey) -> bool:
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
