"""The package folder signed in the OpenSSF model-signing format (``model_signing``, a Sigstore
bundle over the SHA-256 of every file), so the ecosystem's own tool verifies a kdsec package::

    model_signing verify key PACKAGE --signature PACKAGE/model.sig --public_key signing.pem.pub

kdsec signs with its ECDSA P-256 package key (key-based signing). The library's Sigstore mode
(keyless, an OIDC identity and the public transparency log) works on the same folder from its
CLI: ``model_signing sign sigstore PACKAGE --signature PACKAGE/model.sig``; it needs internet.

The library's key signer and verifier read keys from files; kdsec's key may come from an
environment variable, so they are given the key objects directly (``model_signing`` is pinned
to 1.1.x in the lock for that reason).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from kdsec.errors import IntegrityError

SIGNATURE = "model.sig"


def _hashing():
    from model_signing import hashing

    # Ignore the signature itself; git paths are not ignored (a package has none, and a planted
    # .git folder must break verification, not hide).
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False).set_allow_symlinks(False)


def sign_folder(folder: Path, private_key: ec.EllipticCurvePrivateKey) -> Path:
    """Write ``folder/model.sig`` covering every other file of ``folder``."""
    from model_signing import signing
    from model_signing._signing import sign_ec_key

    class KeySigner(sign_ec_key.Signer):
        def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:  # noqa: D107 — no file: the key object
            sign_ec_key._check_supported_ec_key(key.public_key())
            self._private_key = key

    config = signing.Config().set_hashing_config(_hashing())
    config._signer = KeySigner(private_key)
    config.sign(folder, folder / SIGNATURE)
    return folder / SIGNATURE


def verify_folder(folder: Path, public_key: ec.EllipticCurvePublicKey) -> None:
    """Raise ``IntegrityError`` (one line) unless ``folder/model.sig`` is a valid signature by
    ``public_key`` over exactly the files in ``folder``."""
    from model_signing import verifying
    from model_signing._signing import sign_ec_key

    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise IntegrityError("the trusted key is not an ECDSA key: this package predates OpenSSF model signing")
    if not (folder / SIGNATURE).is_file() or (folder / SIGNATURE).is_symlink():
        raise IntegrityError(f"'{folder}' has no {SIGNATURE}: no OpenSSF model signature")

    class KeyVerifier(sign_ec_key.Verifier):
        def __init__(self, key: ec.EllipticCurvePublicKey) -> None:  # noqa: D107 — no file: the key object
            sign_ec_key._check_supported_ec_key(key)
            self._public_key = key

    config = verifying.Config().set_hashing_config(_hashing())
    config._verifier = KeyVerifier(public_key)
    try:
        config.verify(folder, folder / SIGNATURE)
    except Exception as exc:  # noqa: BLE001 — the library raises ValueError, protobuf and crypto errors alike
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise IntegrityError(f"OpenSSF model signature of '{folder}' does not verify ({detail})") from None
