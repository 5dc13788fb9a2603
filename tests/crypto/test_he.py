import numpy as np
import pytest
import torch

from kdsec.config import HEConfig
from kdsec.crypto.he import (BatchedServer, EncryptedModel, GridPlan, he_ops, plaintext_forward, run_encrypted_input,
                             run_encrypted_model, encrypted_inference)
from kdsec.crypto.seal import KeyHolder, PublicContext, plan_params, scratch
from kdsec.errors import ConfigError, IntegrityError, KdsecError
from kdsec.models import ModelSpec, build_model


def _student(hidden=(16,), seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": list(hidden)}))


@pytest.fixture(scope="module")
def student():
    return _student()


@pytest.mark.parametrize("path, count", [("batched", 48), ("single", 3)])
def test_encrypted_input_agrees_with_plaintext(student, digits, path, count):
    ops = he_ops(student)
    inputs = digits.x_test[:count]
    logits, run = run_encrypted_input(ops, inputs, HEConfig(), path)
    plain = plaintext_forward(ops, inputs)
    assert np.abs(logits - plain).max() < 1e-2
    assert run.agreement == 1.0 and not run.host_had_secret_key
    assert run.samples == count and run.ciphertext_bytes_in > 0 and run.ciphertext_bytes_out > 0


def test_encrypted_model_agrees_and_the_host_package_holds_no_weight(student, digits, tmp_path):
    ops = he_ops(student)
    inputs = digits.x_test[:48]
    logits, run = run_encrypted_model(ops, inputs, HEConfig(), package_dir=tmp_path)
    assert np.abs(logits - plaintext_forward(ops, inputs)).max() < 1e-2 and run.agreement == 1.0
    weights = (tmp_path / "encrypted_model.weights.bin").read_bytes()
    first_row = ops[0].weight[:, 0].astype(np.float64).tobytes()
    assert first_row not in weights and ops[0].weight.astype(np.float32).tobytes()[:16] not in weights
    public = PublicContext.deserialize((tmp_path / "encrypted_model.public_context.bin").read_bytes())
    host_model = EncryptedModel.deserialize(public, weights)
    assert host_model.structure == [["linear", 16, 64], ["square"], ["linear", 10, 16]]
    assert not hasattr(host_model, "ops")


def test_a_deeper_student_runs_in_every_mode(digits):
    ops = he_ops(_student((12, 8)))
    inputs = digits.x_test[:8]
    for logits, run in (run_encrypted_input(ops, inputs, HEConfig(), "batched"),
                        run_encrypted_input(ops, inputs[:1], HEConfig(), "single"),
                        run_encrypted_model(ops, inputs, HEConfig())):
        assert run.agreement == 1.0, run.mode
        assert run.poly_modulus_degree == 16384  # depth > 4 does not fit N=8192 at 128 bits


def test_public_context_never_carries_the_secret_key(student):
    holder = KeyHolder(plan_params(3, 30, 14))
    blob = holder.public_context()
    secret = scratch().dump(holder._secret_key)
    public = PublicContext.deserialize(blob)
    assert not hasattr(public, "_decryptor")
    assert not holder.secret_key_in(blob)
    assert holder.secret_key_in(blob + secret)  # the check does detect a leaked key
    forged = blob[:-10]
    with pytest.raises(IntegrityError, match="truncated"):
        PublicContext.deserialize(forged)


def test_pruned_weights_and_dead_neurons_skip_their_operations(digits):
    dense = _student((32,))
    pruned = _student((32,))
    with torch.no_grad():
        for layer in (pruned.layers[1], pruned.layers[3]):
            layer.weight[layer.weight.abs() < layer.weight.abs().quantile(0.8)] = 0.0
        pruned.layers[1].weight[5] = 0.0  # a hidden neuron with no input: a known constant
        pruned.layers[3].weight[:, 7] = 0.0  # a hidden neuron nothing reads: never computed
    counts = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        ops = he_ops(model)
        holder = KeyHolder(plan_params(BatchedServer.depth(ops), 30, 14))
        server = BatchedServer(holder.public, ops)
        inputs = digits.x_test[:16]
        features = inputs.reshape(16, -1)
        outputs = server.infer([holder.encrypt(features[:, i]) for i in BatchedServer.required_inputs(ops)])
        logits = np.stack([holder.decrypt(ct)[:16] for ct in outputs], axis=1)
        assert (logits.argmax(1) == plaintext_forward(ops, inputs).argmax(1)).all()
        counts[name] = dict(holder.public.counts)
    assert counts["pruned"]["multiply_plain"] <= 0.21 * counts["dense"]["multiply_plain"]
    assert counts["pruned"]["square"] <= 30 and counts["dense"]["square"] == 32
    # squares stay unrelinearized; each output neuron relinearizes its sum once
    assert counts["dense"]["relinearize"] == 10


def test_single_sample_grid_plan_uses_few_rotations(student):
    plan = GridPlan.for_ops(he_ops(student))
    assert (plan.rows, plan.cols) == (16, 64)
    assert len(plan.steps) <= 16 and plan.slots <= 4096


def test_too_deep_for_a_secure_ring_is_a_clear_error():
    with pytest.raises(ConfigError, match="128-bit security bound.*poly_modulus_degree to 16384"):
        plan_params(7, 30, 14, 8192)
    with pytest.raises(ConfigError, match="no secure ring is large enough"):
        plan_params(40, 30, 14)
    assert plan_params(3, 30, 14).poly_modulus_degree == 8192
    assert plan_params(7, 30, 14).poly_modulus_degree == 16384


def test_non_polynomial_layers_are_refused():
    teacher = build_model(ModelSpec("teacher_cnn", (1, 8, 8), 10, {"channels": [4, 8], "fc": 16}))
    with pytest.raises(KdsecError, match="no homomorphic form"):
        he_ops(teacher)


def test_encrypted_inference_runs_every_mode_and_writes_the_host_package(student, digits, tmp_path):
    result = encrypted_inference(student, digits.x_test[:32], HEConfig(latency_samples=2), tmp_path)
    assert {(r.mode, r.path) for r in result.runs} == {("encrypted_input", "batched"),
                                                       ("encrypted_input", "single"),
                                                       ("encrypted_model", "batched")}
    assert result.agreement == 1.0 and all(r.agreement_with_model == 1.0 for r in result.runs)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"he_package.json", "encrypted_input.public_context.bin",
                     "encrypted_model.public_context.bin", "encrypted_model.weights.bin"}
