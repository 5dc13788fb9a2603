import base64
import os
import stat

import pytest

from kdsec.crypto.at_rest import (MAGIC, ModelKey, decrypt_bytes, decrypt_file, encrypt_file, load_or_create_key,
                                  protect_and_verify)
from kdsec.errors import IntegrityError, KeyMaterialError

AAD = b"kdsec-student"


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    return path


@pytest.fixture
def key():
    return ModelKey(os.urandom(32), "test")


def test_round_trip_is_bit_exact(artifact, key, tmp_path):
    encrypted = encrypt_file(artifact, tmp_path / "model.enc", key, AAD)
    assert encrypted.read_bytes().startswith(MAGIC)
    assert artifact.read_bytes() not in encrypted.read_bytes()
    assert decrypt_file(encrypted, key, AAD) == artifact.read_bytes()


@pytest.mark.parametrize("position", [len(MAGIC), len(MAGIC) + 20, -1])
def test_a_single_flipped_byte_is_rejected(artifact, key, tmp_path, position):
    blob = bytearray(encrypt_file(artifact, tmp_path / "model.enc", key, AAD).read_bytes())
    blob[position] ^= 0x01
    with pytest.raises(IntegrityError, match="failed authentication"):
        decrypt_bytes(bytes(blob), key, AAD)


def test_wrong_key_and_wrong_model_name_are_rejected(artifact, key, tmp_path):
    blob = encrypt_file(artifact, tmp_path / "model.enc", key, AAD).read_bytes()
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob, ModelKey(os.urandom(32), "other"), AAD)
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob, key, b"another-model")


def test_truncated_file_is_rejected(artifact, key, tmp_path):
    blob = encrypt_file(artifact, tmp_path / "model.enc", key, AAD).read_bytes()
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt_bytes(blob[:20], key, AAD)


def test_key_file_is_created_0600_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSEC_TEST_KEY", raising=False)
    path = tmp_path / "keys" / "model.key"
    first = load_or_create_key("KDSEC_TEST_KEY", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key("KDSEC_TEST_KEY", path).material == first.material
    assert first.material.hex() not in repr(first)


def test_key_file_readable_by_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSEC_TEST_KEY", raising=False)
    path = tmp_path / "model.key"
    load_or_create_key("KDSEC_TEST_KEY", path)
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


def test_protect_and_verify_proves_all_three_properties(artifact, key, tmp_path):
    result = protect_and_verify(artifact, tmp_path / "model.enc", key, AAD)
    assert result.roundtrip_exact and result.tamper_rejected and result.wrong_key_rejected and result.passed
    assert result.encrypted_bytes == artifact.stat().st_size + len(MAGIC) + 12 + 16
