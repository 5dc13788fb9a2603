"""An attacker's view of the package boundary: links, traversal, oversize files, malformed and
fuzzed manifests, and the OpenSSF model signature checked by the ecosystem's own CLI."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdsec.crypto.keys import LocalKeyProvider, load_or_create_signer, public_key_path
from kdsec.crypto.model_key import ModelKey
from kdsec.crypto.model_signature import SIGNATURE
from kdsec.crypto.package import MANIFEST, _signed, create_package, open_package, rotate_package_key
from kdsec.errors import IntegrityError, KdsecError
from kdsec.fileio import read_bounded, write_atomic
from tests.crypto.conftest import run_cli as _cli

WEIGHTS = os.urandom(2048)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSEC_TEST_SIGNING", raising=False)
    return (LocalKeyProvider(ModelKey(os.urandom(32), "file:test")),
            load_or_create_signer("KDSEC_TEST_SIGNING", tmp_path / "keys" / "signing.pem"))


@pytest.fixture
def package(tmp_path, keys):
    kek, signer = keys
    return Path(create_package(tmp_path / "pkg", {"weights.safetensors": WEIGHTS}, {"model.json": b"{}"},
                               name="m", version="1", provider=kek, signer=signer).path)


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# --- the writer --------------------------------------------------------------------------------


def test_writer_never_follows_a_planted_partial_link_and_sets_the_mode(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o644)
    out = tmp_path / "weights.safetensors"
    (tmp_path / "weights.safetensors.partial").symlink_to(victim)
    write_atomic(out, b"secret plaintext", mode=0o600)
    assert victim.read_text() == "keep me" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert out.read_bytes() == b"secret plaintext" and stat.S_IMODE(out.stat().st_mode) == 0o600
    old_umask = os.umask(0o077)
    try:  # the mode is set explicitly, whatever the umask
        write_atomic(tmp_path / "report.html", "<html>")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644


def test_writer_leaves_nothing_behind_on_error_and_refuses_without_overwrite(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def broken_fsync(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomic(target, b"new plaintext", mode=0o600)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with pytest.raises(KdsecError, match="already exists") as error:
        write_atomic(target, b"new", overwrite=False)
    _one_line(error)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")  # a dangling link counts as existing
    with pytest.raises(KdsecError, match="already exists"):
        write_atomic(link, b"new", overwrite=False)
    with pytest.raises(KdsecError, match="is a directory"):
        write_atomic(tmp_path, b"new")


def test_bounded_reader_checks_type_and_size_before_reading(tmp_path):
    big = tmp_path / "big"
    with big.open("wb") as handle:
        handle.truncate(64 << 20)
    with pytest.raises(KdsecError, match="over the limit"):
        read_bounded(big, 1 << 20)
    (tmp_path / "link").symlink_to(big)
    with pytest.raises(KdsecError, match="symbolic link"):
        read_bounded(tmp_path / "link", 1 << 30)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(KdsecError, match="not a regular file"):
        read_bounded(tmp_path / "fifo", 1 << 20)


# --- the CLI: decrypt and rotate-key ---------------------------------------------------------------


@pytest.fixture
def cli_package(workdir):
    assert _cli("encrypt", "student.safetensors", "--out", "pkg")[0] == 0
    return workdir


def test_decrypt_through_a_planted_partial_link_writes_only_its_own_0600_file(cli_package):
    victim = cli_package / "victim.txt"
    victim.write_text("unrelated")
    victim.chmod(0o644)
    (cli_package / "plain.safetensors.partial").symlink_to(victim)
    code, out = _cli("decrypt", "pkg", "--out", "plain.safetensors")
    assert code == 0, out
    assert victim.read_text() == "unrelated"
    assert stat.S_IMODE((cli_package / "plain.safetensors").stat().st_mode) == 0o600
    assert (cli_package / "plain.safetensors").read_bytes() == (cli_package / "student.safetensors").read_bytes()


def test_decrypt_refuses_a_directory_and_an_existing_file_unless_forced(cli_package):
    (cli_package / "outdir").mkdir()
    code, out = _cli("decrypt", "pkg", "--out", "outdir")
    assert code == 1 and "is a directory" in out and len(out.strip().splitlines()) == 1, out
    assert list((cli_package / "outdir").iterdir()) == []
    assert not any(p.name.endswith(".partial") for p in cli_package.rglob("*"))
    (cli_package / "plain.safetensors").write_text("precious")
    code, out = _cli("decrypt", "pkg", "--out", "plain.safetensors")
    assert code == 1 and "--force" in out and (cli_package / "plain.safetensors").read_text() == "precious"
    code, out = _cli("decrypt", "pkg", "--out", "plain.safetensors", "--force")
    assert code == 0, out
    assert stat.S_IMODE((cli_package / "plain.safetensors").stat().st_mode) == 0o600


def test_rotate_key_refuses_a_package_that_ships_a_link(cli_package):
    outside = cli_package / "outside.txt"
    outside.write_text("not yours")
    (cli_package / "pkg" / "manifest.json.partial").symlink_to(outside)
    assert _cli("keygen", "--out", "new.key")[0] == 0
    code, out = _cli("rotate-key", "pkg", "--new-key-file", "new.key")
    assert code == 1 and "symbolic link" in out and len(out.strip().splitlines()) == 1, out
    assert outside.read_text() == "not yours"


def test_the_ecosystem_cli_verifies_a_kdsec_package_before_and_after_rotation(cli_package):
    cli = Path(sys.executable).with_name("model_signing")
    pub = public_key_path(cli_package / ".kdsec/keys/signing.pem")

    def ecosystem_verify() -> subprocess.CompletedProcess:
        return subprocess.run([str(cli), "verify", "key", "pkg", "--signature", f"pkg/{SIGNATURE}",
                               "--public_key", str(pub)], capture_output=True, text=True, cwd=cli_package)

    assert ecosystem_verify().returncode == 0, ecosystem_verify().stderr
    code, out = _cli("verify", "pkg")
    assert code == 0 and "OpenSSF model signature ok" in out, out
    assert _cli("keygen", "--out", "new.key")[0] == 0
    assert _cli("rotate-key", "pkg", "--new-key-file", "new.key")[0] == 0
    assert ecosystem_verify().returncode == 0
    (cli_package / "pkg" / "extra.bin").write_bytes(b"smuggled")
    result = ecosystem_verify()
    assert result.returncode != 0
    code, out = _cli("verify", "pkg", "--key-file", "new.key")
    assert code == 1 and "OpenSSF model signature" in out and "extra.bin" in out, out


# --- the manifest ----------------------------------------------------------------------------------


def _resign(package: Path, signer, change) -> None:
    payload = json.loads((package / MANIFEST).read_text())["payload"]
    change(payload)
    (package / MANIFEST).unlink()
    (package / MANIFEST).write_bytes(_signed(payload, signer))


@pytest.mark.parametrize("document, message", [
    ('{"payload": [], "signature": "AA=="}', "not a kdsec manifest"),
    ('{"payload": {}, "signature": 12345}', "not a kdsec manifest"),
    ('{"payload": {}, "signature": "AA==", "extra": 1}', "not a kdsec manifest"),
    ('{"signature": "AA=="}', "not a kdsec manifest"),
    ("[" * 100_000 + "]" * 100_000, "not a kdsec manifest"),
    ('{"payload": {"n": 1' + "0" * 10_000 + '}, "signature": "AA=="}', "not a kdsec manifest"),
    ('{"payload": {}, "signature": "not base64!"}', "malformed signature"),
    ('{"payload": {"signer": []}, "signature": "AAAA"}', "invalid signature"),
    ("\xff\xfe garbage", "not a kdsec manifest"),
])
def test_malformed_manifests_are_one_line(package, keys, document, message):
    kek, signer = keys
    (package / MANIFEST).write_bytes(document.encode("utf-8", "surrogateescape") if isinstance(document, str)
                                     else document)
    with pytest.raises(IntegrityError, match=message) as error:
        open_package(package, kek, signer.public)
    _one_line(error)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("files"), "files: Field required"),
    (lambda p: p["files"].update({"../outside": p["files"].pop("model.json")}), "files"),
    (lambda p: p["files"].update({"/etc/passwd": p["files"].pop("model.json")}), "files"),
    (lambda p: p["files"].update({"sub/model.json": p["files"].pop("model.json")}), "files"),
    (lambda p: p["files"].update({"model.sig": p["files"].pop("model.json")}), "reserved name"),
    (lambda p: p["files"]["model.json"].update(bytes="2"), "bytes"),
    (lambda p: p["files"]["model.json"].update(bytes=10**30), "bytes"),
    (lambda p: p["files"]["model.json"].update(encrypted="no"), "encrypted"),
    (lambda p: p["files"]["weights.safetensors.enc"].pop("data_key"), "data key"),
    (lambda p: p["model"].update(version=7), "model.version"),
    (lambda p: p.update(format="kdsec-package/2"), "unsupported package format"),
])
def test_a_trusted_but_malformed_manifest_is_one_line_and_reads_nothing_outside(package, keys, change, message):
    kek, signer = keys
    _resign(package, signer, change)
    with pytest.raises(IntegrityError, match=message) as error:
        open_package(package, kek, signer.public)
    _one_line(error)


def test_a_listed_file_swapped_for_a_link_or_a_huge_file_is_refused_before_reading(package, keys, tmp_path):
    kek, signer = keys
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:
        handle.truncate(512 << 20)  # sparse: 512 MiB that cost no disk
    enc = package / "weights.safetensors.enc"
    enc.unlink()
    enc.symlink_to(huge)
    with pytest.raises(IntegrityError, match="symbolic link") as error:
        open_package(package, kek, signer.public)
    _one_line(error)
    enc.unlink()
    os.link(huge, enc)  # a hard link is a regular file: refused by its size, from fstat, before reading
    script = textwrap.dedent(f"""
        from pathlib import Path
        from kdsec.crypto.keys import load_or_create_signer, LocalKeyProvider
        from kdsec.crypto.model_key import ModelKey
        from kdsec.crypto.package import open_package
        from kdsec.errors import IntegrityError
        signer = load_or_create_signer("KDSEC_TEST_SIGNING", {str(tmp_path / "keys" / "signing.pem")!r})
        try:
            open_package(Path({str(package)!r}), LocalKeyProvider(ModelKey(bytes(32), "file:x")), signer.public)
        except IntegrityError as exc:
            print(exc)
        # Peak RSS of this process image (VmHWM; ru_maxrss would include the parent's before exec).
        status = Path("/proc/self/status").read_text()
        print(int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) // 1024)
    """)
    env = {key: value for key, value in os.environ.items() if key != "KDSEC_TEST_SIGNING"}
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                           check=True).stdout.splitlines()
    assert "truncated or padded" in lines[0], lines
    assert int(lines[1]) < 300, f"peak RSS {lines[1]} MiB: the file was read before its size was checked"


def test_a_package_with_a_subfolder_or_a_fifo_is_refused(package, keys):
    kek, signer = keys
    os.mkfifo(package / "pipe")
    with pytest.raises(IntegrityError, match="not a regular file"):
        open_package(package, kek, signer.public)


# --- fuzzing: every mutation of a valid manifest is a clean one-line rejection (or still valid) -----

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.sampled_from(["../x", "/etc/passwd", "a/b", "model.sig", "", "."]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


@pytest.fixture(scope="module")
def fuzz_package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    kek = LocalKeyProvider(ModelKey(os.urandom(32), "file:fuzz"))
    signer = load_or_create_signer("KDSEC_FUZZ_SIGNING_UNSET", folder / "keys" / "signing.pem")
    create_package(folder / "pkg", {"weights.safetensors": WEIGHTS}, {"model.json": b"{}"}, name="m", version="1",
                   provider=kek, signer=signer)
    return folder / "pkg", kek, signer, (folder / "pkg" / MANIFEST).read_bytes()


FUZZ_COUNTS = {"cases": 0, "rejected": 0, "accepted": 0}


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_manifests_are_rejected_in_one_line(fuzz_package, data):
    package, kek, signer, original = fuzz_package
    document = json.loads(original)
    kind = data.draw(st.sampled_from(["replace", "delete", "insert", "bytes"]))
    if kind == "bytes":
        blob = bytearray(original)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(blob[: data.draw(st.integers(0, len(blob)))]) if data.draw(st.booleans()) else bytes(blob)
    else:
        paths = [p for p in _paths(document["payload"]) if p]
        path = data.draw(st.sampled_from(paths))
        parent = document["payload"]
        for part in path[:-1]:
            parent = parent[part]
        if kind == "replace":
            parent[path[-1]] = data.draw(JSON_VALUES)
        elif kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = data.draw(JSON_VALUES)
        # Half the structural mutants are re-signed by the trusted key: they reach the typed checks.
        raw = _signed(document["payload"], signer) if data.draw(st.booleans()) else json.dumps(document).encode()
    (package / MANIFEST).unlink()
    (package / MANIFEST).write_bytes(raw)
    FUZZ_COUNTS["cases"] += 1
    try:
        files = open_package(package, kek, signer.public)
    except KdsecError as exc:
        FUZZ_COUNTS["rejected"] += 1
        assert "\n" not in str(exc) and len(str(exc)) < 600, str(exc)
    else:
        FUZZ_COUNTS["accepted"] += 1  # a harmless change (e.g. the creation date) that was re-signed
        assert files["weights.safetensors"] == WEIGHTS
    finally:
        (package / MANIFEST).unlink()
        (package / MANIFEST).write_bytes(original)


def test_fuzz_counts(fuzz_package):
    """Runs after the fuzz test (file order): prints what it tried, for the record."""
    print(f"manifest fuzz: {FUZZ_COUNTS}")
    assert FUZZ_COUNTS["cases"] in (0, 400) and FUZZ_COUNTS["rejected"] >= 0.5 * FUZZ_COUNTS["cases"]


def test_rotation_never_writes_through_links_and_keeps_both_signatures(package, keys, tmp_path):
    kek, signer = keys
    new = LocalKeyProvider(ModelKey(os.urandom(32), "file:new"))
    rotate_package_key(package, kek, new, signer, signer.public)
    assert open_package(package, new, signer.public)["weights.safetensors"] == WEIGHTS
    from kdsec.crypto.package import verify_model_signature

    verify_model_signature(package, signer.public)
    assert sorted(p.name for p in package.iterdir()) == [MANIFEST, "model.json", SIGNATURE, "weights.safetensors.enc"]
