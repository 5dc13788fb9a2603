"""`kdsec keygen / encrypt / verify / decrypt / rotate-key` end to end, in a scratch working directory."""

from kdsec.models import load_checkpoint
from tests.crypto.conftest import run_cli as _run


def test_encrypt_verify_decrypt_rotate_round_trip(workdir):
    code, out = _run("encrypt", "student.safetensors", "--out", "pkg", "--version", "7")
    assert code == 0, out
    assert (workdir / ".kdsec/keys/model.key").exists() and (workdir / ".kdsec/keys/signing.pem.pub").exists()
    code, out = _run("verify", "pkg")
    assert code == 0 and "signature ok" in out and "decrypts ok" in out, out
    code, out = _run("decrypt", "pkg", "--out", "plain.safetensors")
    assert code == 0, out
    assert (workdir / "plain.safetensors").read_bytes() == (workdir / "student.safetensors").read_bytes()
    load_checkpoint(workdir / "plain.safetensors")

    assert _run("keygen", "--out", "new.key")[0] == 0
    before = (workdir / "pkg/weights.safetensors.enc").read_bytes()
    code, out = _run("rotate-key", "pkg", "--new-key-file", "new.key")
    assert code == 0, out
    assert (workdir / "pkg/weights.safetensors.enc").read_bytes() == before
    code, out = _run("decrypt", "pkg", "--out", "old-key.safetensors")
    assert code == 1 and "wrong key" in out and not (workdir / "old-key.safetensors").exists()
    code, out = _run("decrypt", "pkg", "--out", "new-key.safetensors", "--key-file", "new.key")
    assert code == 0, out


def test_tampered_package_fails_verify_with_one_line(workdir):
    assert _run("encrypt", "student.safetensors", "--out", "pkg")[0] == 0
    blob = bytearray((workdir / "pkg/weights.safetensors.enc").read_bytes())
    blob[100] ^= 0xFF
    (workdir / "pkg/weights.safetensors.enc").write_bytes(bytes(blob))
    code, out = _run("verify", "pkg")
    assert code == 1 and "tampered ciphertext" in out
    assert len([line for line in out.splitlines() if line.strip()]) == 1


def test_encrypt_refuses_a_non_checkpoint_and_an_existing_folder(workdir):
    (workdir / "notes.txt").write_text("not weights")
    code, out = _run("encrypt", "notes.txt", "--out", "pkg")
    assert code == 1 and "not a safetensors checkpoint" in out and not (workdir / "pkg").exists()
    (workdir / "pkg").mkdir()
    code, out = _run("encrypt", "student.safetensors", "--out", "pkg")
    assert code == 1 and "already exists" in out


def test_verify_without_a_trusted_key_is_a_clear_error(workdir):
    code, out = _run("verify", "anything")
    assert code == 1 and "no trusted public key" in out
