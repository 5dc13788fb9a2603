import base64
import json
import os
import stat

import pytest

from kdsec.crypto.model_key import ModelKey, load_or_create_key
from kdsec.crypto.keys import LocalKeyProvider, generate_key_file, load_or_create_signer, load_public_key
from kdsec.crypto.package import (MANIFEST, create_package, decrypt_package_to, open_package, protect_and_verify,
                                  rotate_package_key, verify_package)
from kdsec.errors import IntegrityError, KdsecError, KeyMaterialError

WEIGHTS = os.urandom(4096)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSEC_TEST_SIGNING", raising=False)
    kek = LocalKeyProvider(ModelKey(os.urandom(32), "file:test"))
    signer = load_or_create_signer("KDSEC_TEST_SIGNING", tmp_path / "keys" / "signing.pem")
    return kek, signer


@pytest.fixture
def package(tmp_path, keys):
    kek, signer = keys
    create_package(tmp_path / "pkg", {"weights.safetensors": WEIGHTS}, {"model.json": b'{"format": "float"}'},
                   name="kdsec-student", version="3", provider=kek, signer=signer)
    return tmp_path / "pkg"


def test_package_opens_bit_exact_and_stores_no_plaintext(package, keys):
    kek, signer = keys
    assert sorted(p.name for p in package.iterdir()) == [MANIFEST, "model.json", "model.sig", "weights.safetensors.enc"]
    assert WEIGHTS[:64] not in (package / "weights.safetensors.enc").read_bytes()
    manifest = json.loads((package / MANIFEST).read_text())
    assert kek.key.material.hex() not in json.dumps(manifest)
    assert open_package(package, kek, signer.public)["weights.safetensors"] == WEIGHTS


def test_each_package_gets_a_fresh_data_key_and_nonce(tmp_path, keys):
    kek, signer = keys
    blobs = [create_package(tmp_path / name, {"w": WEIGHTS}, {}, name="m", version="1", provider=kek, signer=signer)
             for name in ("a", "b")]
    assert (tmp_path / "a" / "w.enc").read_bytes() != (tmp_path / "b" / "w.enc").read_bytes()
    wrapped = [json.loads((tmp_path / n / MANIFEST).read_text())["payload"]["files"]["w.enc"]["data_key"]["wrapped"]
               for n in ("a", "b")]
    assert wrapped[0] != wrapped[1] and len(blobs) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda p: _flip(p / "weights.safetensors.enc"), "does not match its SHA-256"),
    (lambda p: (p / "weights.safetensors.enc").write_bytes((p / "weights.safetensors.enc").read_bytes()[:100]),
     "truncated"),
    (lambda p: _edit(p, lambda d: d["payload"]["model"].update(version="4")), "invalid signature"),
    (lambda p: _edit(p, lambda d: d.update(signature="")), "unsigned"),
    (lambda p: _edit(p, lambda d: d.update(signature=base64.b64encode(os.urandom(64)).decode())), "invalid signature"),
    (lambda p: (p / MANIFEST).unlink(), "no manifest.json"),
    (lambda p: (p / MANIFEST).write_text((p / MANIFEST).read_text()[:50]), "truncated or not a kdsec manifest"),
    (lambda p: (p / "model.json").write_bytes(b'{"format": "FLOAT"}'), "does not match its SHA-256"),
])
def test_tampering_is_rejected_with_one_line(package, keys, damage, message):
    kek, signer = keys
    damage(package)
    with pytest.raises(IntegrityError, match=message) as error:
        open_package(package, kek, signer.public)
    assert "\n" not in str(error.value)


def test_wrong_kek_and_untrusted_signer_are_rejected(package, keys, tmp_path):
    kek, signer = keys
    with pytest.raises(IntegrityError, match="wrong key"):
        open_package(package, LocalKeyProvider(ModelKey(os.urandom(32), "file:other")), signer.public)
    stranger = load_or_create_signer("KDSEC_TEST_SIGNING", tmp_path / "other" / "signing.pem")
    with pytest.raises(IntegrityError, match="invalid signature"):
        verify_package(package, stranger.public)


def test_a_ciphertext_moved_between_packages_fails_authentication(tmp_path, keys):
    kek, signer = keys
    for version in ("1", "2"):
        create_package(tmp_path / version, {"w": os.urandom(64)}, {}, name="m", version=version, provider=kek,
                       signer=signer)
    # Re-sign a manifest that points at the other version's ciphertext: digests and signature pass, GCM does not.
    manifest = json.loads((tmp_path / "2" / MANIFEST).read_text())["payload"]
    (tmp_path / "2" / "w.enc").write_bytes((tmp_path / "1" / "w.enc").read_bytes())
    entry = manifest["files"]["w.enc"]
    import hashlib
    entry["sha256"] = hashlib.sha256((tmp_path / "2" / "w.enc").read_bytes()).hexdigest()
    entry["data_key"] = json.loads((tmp_path / "1" / MANIFEST).read_text())["payload"]["files"]["w.enc"]["data_key"]
    from kdsec.crypto.package import _signed
    (tmp_path / "2" / MANIFEST).write_bytes(_signed(manifest, signer))
    with pytest.raises(IntegrityError):
        open_package(tmp_path / "2", kek, signer.public)


def test_rotation_rewraps_without_touching_the_weights(package, keys):
    kek, signer = keys
    before = (package / "weights.safetensors.enc").read_bytes()
    new = LocalKeyProvider(ModelKey(os.urandom(32), "file:new"))
    info = rotate_package_key(package, kek, new, signer, signer.public)
    assert info.kek_ids == [new.key_id]
    assert (package / "weights.safetensors.enc").read_bytes() == before
    assert open_package(package, new, signer.public)["weights.safetensors"] == WEIGHTS
    with pytest.raises(IntegrityError, match="wrong key"):
        open_package(package, kek, signer.public)


def test_decrypt_writes_nothing_when_a_check_fails(package, keys, tmp_path):
    kek, signer = keys
    out = tmp_path / "out" / "weights.safetensors"
    _flip(package / "weights.safetensors.enc")
    with pytest.raises(IntegrityError):
        decrypt_package_to(package, kek, signer.public, "weights.safetensors", out)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_existing_destination_is_refused_and_left_alone(package, keys):
    kek, signer = keys
    before = (package / MANIFEST).read_bytes()
    with pytest.raises(KdsecError, match="already exists"):
        create_package(package, {"w": b"x"}, {}, name="m", version="1", provider=kek, signer=signer)
    assert (package / MANIFEST).read_bytes() == before


def test_protect_and_verify_proves_every_property(tmp_path, keys):
    kek, signer = keys
    result = protect_and_verify(tmp_path / "pkg", {"weights.safetensors": WEIGHTS}, {"model.json": b"{}"},
                                name="m", version="1", provider=kek, signer=signer, key_source="file:test")
    assert result.passed and result.encrypted_bytes == len(WEIGHTS) + 12 + 16


def test_key_files_are_0600_never_overwritten_and_keys_never_in_repr(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSEC_TEST_KEY", raising=False)
    path = tmp_path / "keys" / "model.key"
    first = load_or_create_key("KDSEC_TEST_KEY", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key("KDSEC_TEST_KEY", path).material == first.material
    assert first.material.hex() not in repr(first)
    with pytest.raises(KeyMaterialError, match="already exists"):
        generate_key_file(path, "kek")
    signing = generate_key_file(tmp_path / "sign.pem", "signing")
    assert stat.S_IMODE(signing.stat().st_mode) == 0o600
    load_public_key(tmp_path / "sign.pem.pub")
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        load_or_create_key("KDSEC_TEST_KEY", path)


def test_env_key_wins_and_bad_env_key_is_one_line(tmp_path, monkeypatch):
    material = os.urandom(32)
    monkeypatch.setenv("KDSEC_TEST_KEY", base64.b64encode(material).decode())
    assert load_or_create_key("KDSEC_TEST_KEY", tmp_path / "unused.key").material == material
    assert not (tmp_path / "unused.key").exists()
    monkeypatch.setenv("KDSEC_TEST_KEY", "too-short")
    with pytest.raises(KeyMaterialError, match=r"\$KDSEC_TEST_KEY must hold a 32-byte key"):
        load_or_create_key("KDSEC_TEST_KEY", tmp_path / "unused.key")


def _flip(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def _edit(package, change):
    document = json.loads((package / MANIFEST).read_text())
    change(document)
    (package / MANIFEST).write_text(json.dumps(document))
