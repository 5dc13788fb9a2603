import copy
import json

import numpy as np
import pytest
import torch

from kdsec.compress import global_magnitude_prune, load_weights, quantize_dynamic_int8, save_int8
from kdsec.compress.quantize import DynamicQuantLinear
from kdsec.config import DataConfig, HEConfig, load_config
from kdsec.he import (HE_FRIENDLY_ARCHS, BatchedServer, EncryptedModel, GridPlan, LinearOp, he_ops,
                             SquareOp, plaintext_forward, run_encrypted_input, run_encrypted_model, encrypted_inference)
from kdsec.he.params import HEParams, plan_params
from kdsec.he.seal import KeyHolder, PublicContext, scratch
from kdsec.he.bundle import ParamsHeader
from kdsec.errors import ConfigError, IntegrityError, KdsecError
from kdsec.models import ModelSpec, build_model, save_checkpoint
from kdsec.train import fit, seed_everything


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


def test_the_client_uploads_seeded_ciphertexts_half_the_size_that_a_host_expands():
    holder = KeyHolder(plan_params(3, 30, 14))
    public = PublicContext.deserialize(holder.public_context())
    rows = [np.linspace(-1, 1, holder.params.slots) * k for k in (1.0, 3.0)]
    seeded = holder.encrypt_bundle(rows)
    full = holder.public.dump_ciphertexts([holder.encrypt(row) for row in rows])
    assert len(seeded) < 0.55 * len(full)
    loaded = public.load_ciphertexts(seeded, expected=2)  # the host expands the seed
    doubled = public.rescale(public.multiply_plain(loaded[1], 2.0))
    assert np.abs(holder.decrypt(loaded[0]) - rows[0]).max() < 1e-3
    assert np.abs(holder.decrypt(doubled) - 2 * rows[1]).max() < 1e-3


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


def test_the_batched_chain_leaves_the_last_linear_unrescaled_and_drops_a_prime():
    short = plan_params(3, 30, 14, unrescaled_last=True)
    assert short.coeff_mod_bit_sizes == (60, 30, 30, 60) and short.last_scale_bits == 15
    assert short.poly_modulus_degree == 8192 and short.program_depth == 3 and short.depth == 2
    assert plan_params(7, 30, 14, unrescaled_last=True).poly_modulus_degree == 16384  # never a larger ring
    assert plan_params(1, 30, 14, unrescaled_last=True).last_scale_bits is None  # nothing to save
    assert plan_params(3, 40, 14, unrescaled_last=True).last_scale_bits is None  # 2^-5 weights: too coarse
    assert HEParams.from_dict(short.as_dict()) == short and "last_scale_bits" not in plan_params(3, 30, 14).as_dict()

    # same answers as the usual chain, logits up to ~2^12 included (the integer headroom)
    rng = np.random.default_rng(3)
    last = rng.normal(size=(3, 8)) * 60
    last[0, 0] = 1e-6  # zero once encoded at 2^15: skipped (SEAL refuses a product that is all zeros)
    ops = [LinearOp(rng.normal(size=(8, 6)), rng.normal(size=8)), SquareOp(), LinearOp(last, rng.normal(size=3))]
    inputs = rng.uniform(-1, 1, size=(64, 6))
    plain = plaintext_forward(ops, inputs)
    assert 1000 < np.abs(plain).max() < 2**13
    errors = []
    for params in (short, plan_params(3, 30, 14)):
        holder = KeyHolder(params)
        public = PublicContext.deserialize(holder.public_context())
        outputs = BatchedServer(public, ops).infer([holder.encrypt(inputs[:, i]) for i in range(6)])
        logits = np.stack([holder.decrypt(ct)[:64] for ct in outputs], axis=1)
        errors.append(np.abs(logits - plain).max() / np.abs(plain).max())
    # rescaling snaps the scale back to 2^30 (~1e-4 relative each time): one rescale fewer, no worse
    assert errors[0] < 1e-3 and errors[1] < 1e-3 and errors[0] <= 1.5 * errors[1], errors

    # a context whose unrescaled sums would leave under 4 integer bits is refused before SEAL sees it
    forged = json.loads(json.dumps(short.as_dict()))
    forged["last_scale_bits"] = 60 - 30 - 1 - 4
    ParamsHeader(**forged)  # the smallest headroom a config may ask for (integer_bits 4)
    forged["last_scale_bits"] += 1
    with pytest.raises(ValueError, match="last_scale_bits"):
        ParamsHeader(**forged)


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


def test_a_lowering_bug_agrees_with_its_own_program_but_fails_the_he_gate(student, digits, monkeypatch):
    """The encrypted run matches the plaintext of the program it was lowered to, whatever that
    computes: only the comparison with the shipped model's own predictions sees a lowering that
    differs from the model (here the last layer's rows permuted, as a wrong fold could)."""
    from kdsec.config import GatesConfig
    from kdsec.he import runner
    from kdsec.gates import evaluate_gates, he_gate_metrics

    lower = runner.he_program

    def wrong_lowering(model):
        preprocess, ops = lower(model)
        last = ops[-1]
        return preprocess, [*ops[:-1], LinearOp(last.weight[::-1].copy(), last.bias[::-1].copy())]

    monkeypatch.setattr(runner, "he_program", wrong_lowering)
    result = encrypted_inference(student, digits.x_test[:32], HEConfig(latency_samples=0))
    assert result.agreement == 1.0 and result.agreement_with_model == 0.0
    he = next(v for v in evaluate_gates(he_gate_metrics(result), GatesConfig()) if v.name == "he")
    assert not he.passed
    assert [c.metric for c in he.checks if not c.passed] == ["he.agreement_with_model"]


# --- the path the pipeline runs ------------------------------------------------------------------
# The pipeline's ``homomorphic_inference`` stage loads the candidate from its file and calls
# ``encrypted_inference(model, x_test[:max_samples or all], config.encrypt.he, package_dir)``.
# The candidate is a trained he_mlp student, possibly magnitude-pruned (zeros), possibly int8.


@pytest.fixture(scope="module")
def default_config():
    return load_config()


@pytest.fixture(scope="module")
def candidates(default_config, digits, tmp_path_factory):
    """The default config's student, briefly trained on digits; its global magnitude-pruned copy at
    ``compress.sparsity``; that copy in int8: checkpoint files, as the compression stage writes them."""
    config = default_config
    assert config.data == DataConfig()  # the ``digits`` fixture is the pipeline's data
    assert config.student.arch in HE_FRIENDLY_ARCHS and config.student.pool == 1 and config.compress.sparsity > 0
    spec = ModelSpec(config.student.arch, digits.input_shape, digits.num_classes,
                     {"hidden": list(config.student.hidden)})
    seed_everything(0)
    dense = build_model(spec)
    fit(dense, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
        config.student.train.model_copy(update={"epochs": 8, "patience": 8}))
    pruned = global_magnitude_prune(copy.deepcopy(dense).cpu(), config.compress.sparsity)
    folder = tmp_path_factory.mktemp("candidates")
    return {"dense": save_checkpoint(dense.cpu(), spec, folder / "dense.safetensors"),
            "pruned": save_checkpoint(pruned, spec, folder / "pruned.safetensors"),
            "pruned_int8": save_int8(quantize_dynamic_int8(pruned), spec, folder / "pruned_int8.safetensors")}


@pytest.mark.parametrize("variant", ["dense", "pruned", "pruned_int8"])
def test_the_pipeline_entry_on_a_trained_candidate_passes_the_default_gate(default_config, digits, candidates,
                                                                           variant, tmp_path, monkeypatch):
    he, gate = default_config.encrypt.he, default_config.gates.min_he_agreement
    model, _, weight_format = load_weights(candidates[variant])  # what load_variant does
    assert weight_format == ("int8" if variant.endswith("int8") else "float")
    assert any(isinstance(m, DynamicQuantLinear) for m in model.modules()) == variant.endswith("int8")
    inputs = digits.x_test[: he.max_samples] if he.max_samples else digits.x_test  # homomorphic_inference's cap
    with torch.inference_mode():
        predictions = model(torch.as_tensor(inputs)).argmax(1).numpy()
    assert (predictions == digits.y_test[: len(inputs)]).mean() >= 0.85  # a trained student, not a random one

    weights = [op.weight for op in he_ops(model) if isinstance(op, LinearOp)]
    total, nonzero = sum(w.size for w in weights), sum(int(np.count_nonzero(w)) for w in weights)
    if variant == "dense":
        assert nonzero == total
    else:  # the zeros survive the file (and int8) round trip, so the batched host can skip them
        assert nonzero == total - round(default_config.compress.sparsity * total)
    batched_counts = []
    infer = BatchedServer.infer

    def counting_infer(self, features):
        outputs = infer(self, features)
        batched_counts.append(dict(self.public.counts))
        return outputs

    monkeypatch.setattr(BatchedServer, "infer", counting_infer)
    labels = digits.y_test[: len(inputs)]
    result = encrypted_inference(model, inputs, he, tmp_path if he.log_packages else None, labels)

    # Every mode the default config enables ran, on the samples the pipeline gives it.
    assert set(he.modes) == {"encrypted_input", "encrypted_model"} and he.latency_samples > 0 and he.log_packages
    expected = {("encrypted_input", "batched"): len(inputs),
                ("encrypted_input", "single"): min(he.latency_samples, len(inputs)),
                ("encrypted_model", "batched"): len(inputs)}
    assert {(r.mode, r.path): r.samples for r in result.runs} == expected
    # One ciphertext of slots holds the whole split: the batched host ran once, multiplying by
    # every kept weight at most once and by no pruned one.
    assert len(batched_counts) == 1
    if variant == "dense":
        assert batched_counts[0]["multiply_plain"] == total
    else:
        assert 0 < batched_counts[0]["multiply_plain"] <= nonzero

    for run in result.runs:
        assert run.agreement >= gate and run.agreement_with_model >= gate, (run.mode, run.path)
        assert 0 < run.max_abs_logit_error < 0.05, (run.mode, run.path)  # CKKS noise: real, and small
        assert run.ms_per_sample >= run.server_ms_per_sample > 0 and not run.host_had_secret_key
        assert run.scale_bits == he.scale_bits and run.poly_modulus_degree in (8192, 16384)
        sizes = run.coeff_mod_bit_sizes
        if (run.mode, run.path) == ("encrypted_input", "batched"):
            # the paired chain: one 60-bit prime per x² (this student has one), weights at 2^15, and
            # inputs at 2^(60 − 2·15): no prime per Linear
            assert sizes == (60, 60, 60) and run.weight_scale_bits == he.weight_scale_bits == 15
            continue
        assert sizes[0] == sizes[-1] == he.scale_bits + he.integer_bits
        assert set(sizes[1:-1]) == {he.scale_bits} and run.weight_scale_bits is None
        assert run.ciphertext_bytes_out > 0 and run.public_context_bytes > 0
        assert (run.ciphertext_bytes_in > 0) == (run.mode == "encrypted_input")

    # Accuracy as evaluated under encryption: the decrypted argmax against the labels, within the
    # disagreements of the plaintext model's own accuracy; only the batched run (the whole split) counts.
    plain_accuracy = float((predictions == labels).mean())
    assert abs(result.accuracy - plain_accuracy) <= 1 - result.run("encrypted_input", "batched").agreement_with_model
    assert result.run("encrypted_input", "single").accuracy is None
    # What the gate and summary.json read.
    summary = result.as_dict()
    batched, single = result.run("encrypted_input", "batched"), result.run("encrypted_input", "single")
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["enabled"] is True and summary["host_had_secret_key"] is False
    assert summary["agreement"] == result.agreement == min(r.agreement for r in result.runs) >= gate
    assert summary["samples"] == len(inputs) and summary["ms_per_sample"] == batched.ms_per_sample
    assert summary["single_sample_ms"] == single.ms_per_sample
    assert summary["runs"] == [r.as_dict() for r in result.runs]

    # The host package: what each run says it hands the host is the files written.
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    index = json.loads((tmp_path / "he_package.json").read_text())
    assert index["files"] == {name: {"sha256": index["files"][name]["sha256"], "bytes": size}
                              for name, size in files.items() if name.endswith(".bin")}
    assert batched.package_bytes == files["encrypted_input.public_context.bin"]
    model_run = result.run("encrypted_model", "batched")
    assert model_run.package_bytes == (files["encrypted_model.public_context.bin"]
                                       + files["encrypted_model.weights.bin"])
    assert index["structure"] == [layer for w in weights for layer in (["linear", *w.shape], ["square"])][:-1]
    assert [(r["mode"], r["path"]) for r in index["runs"]] == [(r.mode, r.path) for r in result.runs]


def test_batched_chunks_on_two_host_processes_decrypt_like_one(caplog):
    """More samples than one ciphertext holds: two spawned host processes (public context bytes
    only) evaluate the chunks while the client encrypts; same logits as one host, same order."""
    from kdsec.he import SquareOp, plaintext_forward

    rng = np.random.default_rng(0)
    ops = [LinearOp(rng.normal(size=(3, 4)), rng.normal(size=3)), SquareOp(),
           LinearOp(rng.normal(size=(2, 3)), rng.normal(size=2))]
    inputs = rng.uniform(-1, 1, size=(4096 + 300, 4))
    alone, one = run_encrypted_input(ops, inputs, HEConfig(host_workers=1), "batched")
    with caplog.at_level("WARNING", logger="kdsec"):
        together, two = run_encrypted_input(ops, inputs, HEConfig(host_workers=2), "batched")
    assert not caplog.records  # the host processes ran: no fallback to this process
    np.testing.assert_allclose(together, plaintext_forward(ops, inputs), atol=1e-2)
    np.testing.assert_allclose(together, alone, atol=1e-2)
    assert two.agreement == one.agreement == 1.0 and two.samples == 4396
    # (compressed ciphertexts of fresh encryptions: sizes differ in the last bytes)
    assert abs(two.ciphertext_bytes_in - one.ciphertext_bytes_in) < 0.01 * one.ciphertext_bytes_in
    assert not two.host_had_secret_key


def test_auto_host_workers_are_one_per_core_at_most_one_per_chunk(monkeypatch):
    import os

    from kdsec.he.batched import host_workers

    for cores, chunks, expected in ((2, 5, 2), (1, 5, 1), (8, 5, 5), (8, 20, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert host_workers(HEConfig(), chunks) == expected, (cores, chunks)
    assert host_workers(HEConfig(host_workers=4), 20) == 4


def test_encrypted_model_stops_at_its_time_budget_and_reports_the_samples_it_ran(caplog):
    """Over encrypt.he.max_mode_seconds the encrypted model stops after the current chunk: the run
    reports the samples evaluated (agreement over them), and the log says how many of how many."""
    from kdsec.he import SquareOp

    rng = np.random.default_rng(1)
    ops = [LinearOp(rng.normal(size=(3, 4)), rng.normal(size=3)), SquareOp(),
           LinearOp(rng.normal(size=(2, 3)), rng.normal(size=2))]
    inputs = rng.uniform(-1, 1, size=(1500, 4))  # blocks of 4 slots: 1024 samples per ciphertext
    with caplog.at_level("WARNING", logger="kdsec"):
        logits, run = run_encrypted_model(ops, inputs, HEConfig(max_mode_seconds=1e-6))
    assert run.samples == len(logits) == 1024 and run.agreement == 1.0
    assert "1024 of 1500 samples within encrypt.he.max_mode_seconds" in caplog.text
    _, whole = run_encrypted_model(ops, inputs, HEConfig())
    assert whole.samples == 1500
