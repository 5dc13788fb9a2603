import numpy as np
import pytest
import torch

from kdsec.config import HEConfig
from kdsec.crypto.he import HEClient, HEServer, encrypted_inference, he_ops, multiplicative_depth, plan_params
from kdsec.errors import ConfigError, KdsecError
from kdsec.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]}))


def test_encrypted_inference_agrees_with_plaintext_on_a_batch(student, digits):
    inputs = digits.x_test[:48]
    logits, result = encrypted_inference(student, inputs, HEConfig())
    with torch.inference_mode():
        plain = student(torch.as_tensor(inputs)).double().numpy()
    assert np.abs(logits - plain).max() < 1e-2
    assert result.agreement == 1.0 and result.agreement_with_model == 1.0
    assert not result.server_had_secret_key
    assert result.samples == 48 and result.ciphertext_bytes_in > 0 and result.public_context_bytes > 0


def test_server_context_has_no_secret_key_and_a_secret_one_is_refused(student, digits):
    client = HEClient(plan_params(multiplicative_depth(he_ops(student)), HEConfig()))
    server = HEServer(client.public_context(), he_ops(student))
    assert not server.context.has_secret_key()
    outputs = server.infer(client.encrypt(digits.x_test[:4]))
    assert client.decrypt(outputs, 4).shape == (4, 10)
    with pytest.raises(KdsecError, match="secret key"):
        HEServer(client.context.serialize(save_secret_key=True), he_ops(student))


def test_too_deep_for_a_secure_ring_is_a_clear_error():
    with pytest.raises(ConfigError, match="128-bit security bound.*poly_modulus_degree to 16384"):
        plan_params(7, HEConfig(poly_modulus_degree=8192))
    with pytest.raises(ConfigError, match="no secure ring is large enough"):
        plan_params(40, HEConfig())


def test_non_polynomial_layers_are_refused(digits):
    teacher = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [4, 8], "fc": 16}))
    with pytest.raises(KdsecError, match="no homomorphic form"):
        he_ops(teacher)


def test_pruned_weights_are_skipped_and_still_agree(student, digits):
    pruned = build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [16]}))
    pruned.load_state_dict(student.state_dict())
    with torch.no_grad():
        weight = pruned.layers[1].weight
        weight[weight.abs() < weight.abs().quantile(0.8)] = 0.0
    ops = he_ops(pruned)
    assert (ops[0].weight == 0).mean() >= 0.79
    _, result = encrypted_inference(pruned, digits.x_test[:32], HEConfig())
    assert result.agreement == 1.0
