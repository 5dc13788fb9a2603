"""A real host process on localhost: it gets the plaintext model and public contexts only."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from kdsec.crypto.he import he_ops, plaintext_forward
from kdsec.crypto.he_http import HEHttpClient
from kdsec.crypto.seal import KeyHolder, pack, plan_params, scratch, unpack
from kdsec.errors import KdsecError
from kdsec.models import ModelSpec, build_model, save_checkpoint


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]})
    model = build_model(spec)
    checkpoint = save_checkpoint(model, spec, tmp_path_factory.mktemp("host") / "student.safetensors")
    process = subprocess.Popen([sys.executable, "-m", "kdsec.crypto.he_http", "--model", str(checkpoint),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert "listening on" in line, process.stderr.read()
    yield line.rsplit(" ", 1)[1].strip(), he_ops(model)
    process.terminate()
    process.wait(timeout=10)


@pytest.mark.parametrize("path, count", [("batched", 24), ("single", 2)])
def test_round_trip_over_http_agrees_with_plaintext(host, digits, path, count):
    url, ops = host
    client = HEHttpClient(url, path=path)
    logits = client.predict_logits(digits.x_test[:count])
    plain = plaintext_forward(ops, digits.x_test[:count])
    assert np.abs(logits - plain).max() < 1e-2
    assert (logits.argmax(1) == plain.argmax(1)).all()


def test_host_refuses_a_context_that_carries_a_secret_key(host):
    url, _ = host
    holder = KeyHolder(plan_params(3, 30, 14))
    header, blobs = unpack(holder.public_context(), "public-context")
    header = {**{k: v for k, v in header.items() if k != "sizes"}, "roles": header["roles"] + ["secret_key"]}
    forged = pack(header, blobs + [scratch().dump(holder._secret_key)])
    client = HEHttpClient.__new__(HEHttpClient)
    client.url = url
    with pytest.raises(KdsecError, match="a secret key is never accepted"):
        client._request("POST", "/sessions", forged)
