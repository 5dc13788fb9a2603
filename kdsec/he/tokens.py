"""Who may use an HE host: bearer tokens made by ``kdsec he-token``, kept only as hashes.

A token reads ``kdsec-he_<id>_<secret>``: a 12-hex-digit id that names it (in lists, revocations
and the host's refusals) and 32 random bytes, base64url. The store, a JSON file written 0600,
keeps per token its id, client name, host id (the one host it is for), times and the SHA-256 of
the secret; never the secret, which is shown once, at creation. The secret is 256 random bits, so
a fast hash is enough (nothing to brute-force), compared in constant time.

The host re-reads the store when the file changes: a revocation applies to the next request.
Refusals name at most the id, which authenticates nothing; no refusal or log line holds a secret.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kdsec.errors import ConfigError
from kdsec.fileio import PRIVATE, write_atomic

TOKEN = re.compile(r"kdsec-he_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
MAX_STORE_BYTES = 8 << 20
log = logging.getLogger(__name__)
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]


class TokenRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{12}$")]
    client: Label
    host: Label
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    created: float
    expires: float | None = None
    revoked: float | None = None


class TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(1, ge=1, le=1)
    tokens: list[TokenRecord] = Field(default_factory=list, max_length=100_000)


class AuthError(Exception):
    """A refused credential: ``status`` 401 (none, malformed, unknown, wrong) or 403 (revoked,
    expired, for another host); the message names the token by id at most."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """The token file: create, revoke, list (the ``kdsec he-token`` commands) and read (the host)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> TokenFile:
        if not self.path.exists():
            return TokenFile()
        if self.path.is_symlink() or not self.path.is_file():
            raise ConfigError(f"token store {self.path} is not a regular file (links are refused)")
        if self.path.stat().st_size > MAX_STORE_BYTES:
            raise ConfigError(f"token store {self.path} is over {MAX_STORE_BYTES >> 20} MiB")
        try:
            return TokenFile.model_validate_json(self.path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read token store {self.path}: {exc.strerror or exc}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"token store {self.path} is malformed at {where or 'top level'}: {first['msg']}") from None

    def _write(self, tokens: TokenFile) -> None:
        write_atomic(self.path, json.dumps(tokens.model_dump(mode="json"), indent=1), mode=PRIVATE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Read-modify-write under an exclusive lock (a create beside a revoke loses neither)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path.with_name(self.path.name + ".lock"),
                             os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def create(self, client: str, host: str, days: float | None = None) -> tuple[str, TokenRecord]:
        """A new token for ``client`` on host ``host``, valid ``days`` (None: until revoked): the
        token (shown once) and its record."""
        if days is not None and not 0 < days < 1e6:
            raise ConfigError(f"--days must be positive (and under a million), got {days}")
        with self._locked():
            return self._create(client, host, days)

    def _create(self, client: str, host: str, days: float | None) -> tuple[str, TokenRecord]:
        tokens = self.read()
        ids = {record.id for record in tokens.tokens}
        token_id = secrets.token_hex(6)
        while token_id in ids:
            token_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        now = time.time()
        try:
            record = TokenRecord(id=token_id, client=client, host=host, sha256=_digest(secret), created=now,
                                 expires=None if days is None else now + days * 86400)
        except ValidationError as exc:
            field = exc.errors()[0]["loc"][0]
            given = {"client": client, "host": host}[field]
            raise ConfigError(f"{field} must be 1-64 letters, digits or . _ @ - (got {given!r})") from None
        tokens.tokens.append(record)
        self._write(tokens)
        return f"kdsec-he_{token_id}_{secret}", record

    def revoke(self, token_id: str) -> TokenRecord:
        with self._locked():
            return self._revoke(token_id)

    def _revoke(self, token_id: str) -> TokenRecord:
        tokens = self.read()
        for index, record in enumerate(tokens.tokens):
            if record.id == token_id:
                if record.revoked is None:
                    record = record.model_copy(update={"revoked": time.time()})
                    tokens.tokens[index] = record
                    self._write(tokens)
                return record
        raise ConfigError(f"no token with id '{token_id[:40]}' in {self.path}")


class Authenticator:
    """The host's check of an ``Authorization`` header against the store, re-read on change."""

    def __init__(self, store: TokenStore, host_id: str) -> None:
        self.store, self.host_id = store, host_id
        self._lock = threading.Lock()
        self._seen: tuple | None = None
        self._by_id: dict[str, TokenRecord] = {}
        self._refresh()

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.store.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen == self._seen and self._seen is not None:
                return
            self._by_id = {record.id: record for record in self.store.read().tokens}
            self._seen = seen

    def client(self, authorization: str | None) -> str:
        """The client name the header's token belongs to; AuthError otherwise."""
        if not authorization:
            raise AuthError(401, "a client token is required: send 'Authorization: Bearer <token>' "
                                 "(made by kdsec he-token create)")
        scheme, _, token = authorization.strip().partition(" ")
        match = TOKEN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise AuthError(401, "malformed credential: expected 'Authorization: Bearer kdsec-he_<id>_<secret>'")
        token_id, secret = match.groups()
        try:
            self._refresh()
        except (ConfigError, OSError) as exc:  # the store broke while serving: refuse, never fail open
            log.error("HE host: %s", exc)  # the reason stays on the host
            raise AuthError(401, "the host cannot check tokens now (its token store is unreadable)") from None
        record = self._by_id.get(token_id)
        if record is None or not hmac.compare_digest(record.sha256, _digest(secret)):
            raise AuthError(401, f"unknown or wrong token (id {token_id})")
        if record.revoked is not None:
            raise AuthError(403, f"token {token_id} was revoked")
        if record.expires is not None and time.time() >= record.expires:
            raise AuthError(403, f"token {token_id} expired")
        if record.host != self.host_id:
            raise AuthError(403, f"token {token_id} is for host '{record.host}', not this one ('{self.host_id}')")
        return record.client


def budget_from_audit(path: Path) -> int:
    """The default query budget for a served model: the queries its audit gave the extraction
    attacker on the interface an HE host serves (probabilities: the client decrypts logits), the
    most answers anyone has measured the extraction risk at. From a run's ``audit.json``."""
    try:
        audit = json.loads(Path(path).read_text())
        rows = [row for row in audit["extraction"] if row["defense"] == "probabilities"]
        queries = int(rows[0]["queries"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"{path}: no extraction audit of the probabilities interface to take a budget "
                          f"from ({type(exc).__name__}); pass --query-budget") from None
    if queries <= 0:
        raise ConfigError(f"{path}: the extraction audit ran with {queries} queries; pass --query-budget")
    return queries
