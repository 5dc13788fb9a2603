"""he_cnn under CKKS: its affine layers lowered to Linear maps (exactly, in float64), encrypted
inference of a trained one, its compressed variants, and the models and layouts that are refused
with one line before anything is encrypted."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from kdsec import trainers
from kdsec.compress import candidates, global_magnitude_prune, quantize_dynamic_int8, save_int8, structured_prune
from kdsec.compress.quantize import load_int8
from kdsec.config import DEFAULT_CONFIG, CompressConfig, HEConfig, TrainConfig, load_config
from kdsec.he import (LinearOp, SquareOp, check_layouts, encrypted_inference, he_ops, he_program,
                             plaintext_forward, run_encrypted_input)
from kdsec.he.encrypted_input import DiagonalPlan, GatherPlan, GridPlan, single_plan
from kdsec.data import DECLARED_SHAPES
from kdsec.distill.features import resolve_tap
from kdsec.errors import ConfigError, KdsecError
from kdsec.models import ModelSpec, build_model, save_checkpoint
from kdsec.models.students import Square
from kdsec.preflight import preflight
from kdsec.train import fit, seed_everything

# 8×8: conv 3×3 keeps 8×8, pooled to 4×4; 4 channels → 64 → 16 → 10.
SMALL = {"channels": [4], "kernel": 3, "stride": 1, "padding": 1, "conv_pool": 2, "hidden": [16], "batchnorm": True}


def _he_cnn(input_shape=(1, 8, 8), seed=0, **options) -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(seed)
    spec = ModelSpec("he_cnn", input_shape, 10, {**SMALL, **options})
    return build_model(spec), spec


def _perturbed(model: nn.Module) -> nn.Module:
    """Distinct nonzero biases and BatchNorm statistics far from the identity, so folding them matters."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _float64_logits(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(inputs.double()).numpy()


# --- (a) lowering: each run of affine layers is one Linear map, exactly --------------------------


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28)])
def test_lowering_equals_the_model_in_float64(input_shape):
    model, _ = _he_cnn(input_shape)
    model = _perturbed(model)
    ops = he_ops(model)
    height, width = input_shape[1:]
    assert [type(op) for op in ops] == [LinearOp, SquareOp, LinearOp, SquareOp, LinearOp]
    assert ops[0].weight.shape == (4 * (height // 2) * (width // 2), height * width)  # conv + BN + pool
    inputs = torch.rand(32, *input_shape, dtype=torch.float64)
    expected = _float64_logits(model, inputs)
    assert np.abs(plaintext_forward(ops, inputs.numpy()) - expected).max() < 1e-9 * np.abs(expected).max()


def test_lowering_leaves_the_model_as_it_was():
    model, _ = _he_cnn()
    model.train()
    norm = model.layers[1]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state = torch.random.get_rng_state()
    he_ops(model)
    assert model.training and norm.training  # BatchNorm ran in eval mode only for the lowering
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_an_input_pooling_is_the_clients_and_folds_into_the_first_map():
    model, _ = _he_cnn((1, 8, 8), pool=2)  # 8×8 → 4×4 on the client; conv → 2×2 maps
    model = _perturbed(model)
    inputs = torch.rand(8, 1, 8, 8)
    preprocess, ops = he_program(model)
    assert preprocess(inputs.numpy()).shape == (8, 16) and ops[0].weight.shape == (4 * 2 * 2, 16)
    folded = he_ops(model)
    assert folded[0].weight.shape == (16, 64)
    expected = _float64_logits(model, inputs)
    for features, program in ((preprocess(inputs.numpy()), ops), (inputs.numpy(), folded)):
        assert np.abs(plaintext_forward(program, features) - expected).max() < 1e-9 * np.abs(expected).max()


def test_the_cryptonets_default_on_28x28():
    model = build_model(ModelSpec("he_cnn", (1, 28, 28), 10, {}))
    assert [op.weight.shape for op in he_ops(model) if isinstance(op, LinearOp)] == [(845, 784), (100, 845), (10, 100)]


# --- (b) encrypted inference of a trained he_cnn ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(digits):
    seed_everything(0)
    model, spec = _he_cnn()
    fit(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
        TrainConfig(epochs=6, patience=6, batch_size=32, lr=3e-3))
    return model.cpu().eval(), spec


def test_batched_encrypted_inference_of_a_trained_he_cnn_agrees_with_plaintext(trained, digits):
    model, _ = trained
    inputs = digits.x_test[:64]
    with torch.no_grad():
        assert (model(torch.as_tensor(inputs)).argmax(1).numpy() == digits.y_test[:64]).mean() >= 0.85  # trained
    ops = he_ops(model)
    logits, run = run_encrypted_input(ops, inputs, HEConfig(), "batched")
    plain = plaintext_forward(ops, inputs)
    assert (logits.argmax(1) == plain.argmax(1)).mean() >= 0.99
    assert run.agreement >= 0.99 and not run.host_had_secret_key
    assert 0 < run.max_abs_logit_error < 0.01 * np.abs(plain).max()  # CKKS noise, through two squares


def test_every_mode_runs_an_he_cnn(digits, tmp_path):
    seed_everything(0)
    model, _ = _he_cnn(hidden=[])  # conv → x² → Linear: depth 3, the smallest ring, so every mode is quick
    fit(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
        TrainConfig(epochs=4, patience=4, batch_size=32, lr=3e-3))
    result = encrypted_inference(model.cpu().eval(), digits.x_test[:64], HEConfig(latency_samples=1), tmp_path)
    assert {(r.mode, r.path) for r in result.runs} == {("encrypted_input", "batched"), ("encrypted_input", "single"),
                                                       ("encrypted_model", "batched")}
    for run in result.runs:
        assert run.agreement >= 0.99 and run.agreement_with_model >= 0.99, (run.mode, run.path)


# --- (c) compressed variants lower too ---------------------------------------------------------------


def test_magnitude_pruned_zeros_reach_the_linear_maps():
    model, _ = _he_cnn(conv_pool=1, batchnorm=False)  # the first map's entries are the kernels' weights
    model = _perturbed(model)
    with torch.no_grad():  # kernels as small as the Linear weights, so global pruning takes some of each
        model.layers[0].weight.mul_(0.2)
    pruned = global_magnitude_prune(model, 0.6)
    conv = pruned.layers[0]
    ops = he_ops(pruned)
    # Where each kernel weight lands: the same model with kernel = 1 where kept, 0 where pruned, no bias.
    footprint = copy.deepcopy(pruned)
    with torch.no_grad():
        footprint.layers[0].weight.copy_((conv.weight != 0).float())
        footprint.layers[0].bias.zero_()
    assert 0 < (conv.weight == 0).float().mean() < 1
    np.testing.assert_array_equal(ops[0].weight != 0, he_ops(footprint)[0].weight != 0)
    hidden = pruned.layers[3].weight.detach().double().numpy()
    np.testing.assert_array_equal(ops[2].weight, hidden)  # a Linear map is its weights, zeros included


def _kept(original: nn.Module, smaller: nn.Module) -> list[int]:
    """Which of the original's output units survive: match their (distinct) bias values."""
    return [int(torch.nonzero(original.bias == value)[0]) for value in smaller.bias]


def test_structured_pruning_gives_a_smaller_he_cnn_that_keeps_its_units(tmp_path):
    model, spec = _he_cnn(channels=[6, 4], conv_pool=1, hidden=[12])  # 0 conv 1 BN 2 x² 3 conv 4 BN 5 x² 6 flat 7 fc
    model = _perturbed(model)
    smaller, smaller_spec = structured_prune(model, spec, 0.5)
    assert smaller_spec.options == {**spec.options, "channels": [3, 2], "hidden": [6]}
    conv1, conv2, fc = (_kept(model.layers[i], smaller.layers[i]) for i in (0, 3, 7))
    # The original with every removed unit's readers silenced computes what the smaller model does.
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.layers[3].weight[:, [c for c in range(6) if c not in conv1]] = 0
        masked.layers[7].weight.view(12, 4, 64)[:, [c for c in range(4) if c not in conv2]] = 0
        masked.layers[9].weight[:, [n for n in range(12) if n not in fc]] = 0
        inputs = torch.rand(8, 1, 8, 8)
        assert torch.allclose(smaller.layers[:3](inputs), model.layers[:3](inputs)[:, conv1], atol=1e-6)
        assert torch.allclose(smaller.layers[:6](inputs), masked.layers[:6](inputs)[:, conv2], atol=1e-6)
        assert torch.allclose(smaller(inputs), masked(inputs), atol=1e-5)
    ops = he_ops(smaller)
    assert [op.weight.shape for op in ops if isinstance(op, LinearOp)] == [(192, 64), (128, 192), (6, 128), (10, 6)]
    expected = _float64_logits(smaller, inputs)
    assert np.abs(plaintext_forward(ops, inputs.numpy()) - expected).max() < 1e-9 * np.abs(expected).max()


def test_an_int8_he_cnn_lowers_with_its_linear_layers_dequantized(tmp_path):
    model, spec = _he_cnn()
    model = _perturbed(model)
    quantized = quantize_dynamic_int8(model)
    reloaded, _ = load_int8(save_int8(quantized, spec, tmp_path / "int8.safetensors"))
    ops = he_ops(reloaded)
    assert [op.weight.shape for op in ops if isinstance(op, LinearOp)] == [(64, 64), (16, 64), (10, 16)]
    np.testing.assert_array_equal(ops[0].weight, he_ops(model)[0].weight)  # conv + BN stay float
    weight, _ = reloaded.layers[5]._weight_bias()
    np.testing.assert_array_equal(ops[2].weight, weight.dequantize().double().numpy())


def test_every_variant_of_an_he_cnn_under_he_has_a_homomorphic_form(trained, digits, tmp_path):
    model, spec = trained
    checkpoint = save_checkpoint(model, spec, tmp_path / "student.safetensors")
    student = trainers.TrainedModel("kd_student", str(checkpoint), spec.to_json(), 0.9, 0.9, 1, 1, 1, 1.0)
    config = CompressConfig(prune_steps=1, finetune_epochs=0, structured_finetune_epochs=0, latency_repeats=1)
    assert config.static_int8  # on by default, yet no static int8 variant: its graph has no homomorphic form
    variants = candidates.compress_student(config, digits, student, TrainConfig(), 0, tmp_path, homomorphic=True)
    assert [v.name for v in variants] == ["dense", "pruned50", "pruned50_int8", "structured50", "structured50_int8"]
    for variant in variants:
        assert isinstance(he_ops(candidates.load_variant(variant))[-1], LinearOp), variant.name


# --- (d) layouts that do not fit: one line, before anything is encrypted ---------------------------


def test_a_conv_student_runs_single_samples_on_the_gather_path():
    """Its grid would need 2048 × 1024 slots: the client sends the convolution's windows (the
    geometry, no weight), the later layer runs by extended diagonals, on the paired chain: one
    60-bit prime per x², same logits. The plan's geometry comes from the layers, not from which
    weights are zero: a pruned copy gets the same plan."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("he_cnn", (1, 28, 28), 10, {"channels": [4], "kernel": 5, "stride": 2,
                                                               "padding": 0, "conv_pool": 2, "hidden": []})).eval()
    preprocess, ops = he_program(model)
    assert GridPlan.for_ops(ops).slots > 16384  # the grid does not fit any ring
    plan = single_plan(ops, HEConfig())
    # 4 maps of 6×6, each output reading a 7×7 window (two 5×5 windows at stride 2, pooled 2×2)
    assert isinstance(plan, GatherPlan) and plan.columns.shape == (4 * 6 * 6, 49)
    assert plan.ciphertexts == 4 and len(plan.steps) <= 16  # 16 blocks of 256 slots a ciphertext
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.layers[0].weight[:, :, :2] = 0.0  # two rows of every kernel pruned
    assert (he_program(pruned)[1][0].weight == 0).any()
    np.testing.assert_array_equal(single_plan(he_program(pruned)[1], HEConfig()).columns, plan.columns)
    inputs = preprocess(np.random.default_rng(0).uniform(0, 1, (3, 1, 28, 28)).astype(np.float32))
    logits, run = run_encrypted_input(ops, inputs, HEConfig(), "single")
    np.testing.assert_allclose(logits, plaintext_forward(ops, inputs), atol=1e-3)
    assert run.agreement == 1.0 and not run.host_had_secret_key
    assert run.poly_modulus_degree == 8192 and run.coeff_mod_bit_sizes == (60, 60, 60)
    assert run.weight_scale_bits == 20 and run.scale_bits == 20


def test_a_program_that_does_not_alternate_runs_single_samples_on_the_diagonal_path():
    """x⁴ (two x² in a row) has no paired chain: W's non-zero diagonals, baby-step giant-step."""
    rng = np.random.default_rng(0)
    first = np.where(rng.random((288, 64)) < 0.1, rng.normal(size=(288, 64)) * 0.3, 0.0)
    ops = [LinearOp(first, rng.normal(size=288) * 0.1), SquareOp(), SquareOp(),
           LinearOp(rng.normal(size=(10, 288)) * 0.1, rng.normal(size=10))]
    plan = single_plan(ops, HEConfig())
    assert isinstance(plan, DiagonalPlan) and len(plan.steps) <= 128
    inputs = rng.uniform(0, 1, (2, 64))
    logits, run = run_encrypted_input(ops, inputs, HEConfig(), "single")
    np.testing.assert_allclose(logits, plaintext_forward(ops, inputs), atol=1e-2)  # x⁴ at 2^30: ~2e-3
    assert run.agreement == 1.0 and run.weight_scale_bits is None


def test_a_single_sample_layout_too_large_for_any_ring_is_refused_before_encryption(monkeypatch):
    # 16,400 outputs: the gather layout needs blocks of 32768 slots, the diagonal plan 16,416 (32768 with padding)
    ops = [LinearOp(np.full((16400, 16), 0.1), np.zeros(16400)), SquareOp(),
           LinearOp(np.full((10, 16400), 0.1), np.zeros(10))]

    def no_keys(*args, **kwargs):
        raise AssertionError("keys were made before the layout was checked")

    monkeypatch.setattr("kdsec.he.encrypted_input.KeyHolder", no_keys)
    with pytest.raises(ConfigError, match=r"single-sample path needs 32768 slots for this student but "
                                          r"poly_modulus_degree 32768 has 16384; set encrypt\.he\.latency_samples=0") as caught:
        check_layouts(ops, HEConfig(modes=["encrypted_input"]))
    assert "\n" not in str(caught.value)
    check_layouts(ops, HEConfig(modes=["encrypted_input"], latency_samples=0))  # without that path it fits


def test_an_encrypted_model_over_the_memory_bound_names_the_modes():
    shapes = [(845, 6000), (100, 845), (10, 100)]  # shapes only: nothing is allocated
    ops = [LinearOp(np.broadcast_to(0.0, shape), np.zeros(shape[0])) for shape in shapes]
    ops = [ops[0], SquareOp(), ops[1], SquareOp(), ops[2]]
    with pytest.raises(ConfigError, match=r"6221 weight ciphertexts .* GiB \(limit 8 GiB\); remove encrypted_model "
                                          r"from encrypt\.he\.modes") as caught:
        check_layouts(ops, HEConfig(latency_samples=0))
    assert "\n" not in str(caught.value)
    check_layouts(ops, HEConfig(modes=["encrypted_input"], latency_samples=0))


def test_preflight_checks_the_smallest_candidates_layouts_on_the_datasets_shape(digits, workdir):
    assert DECLARED_SHAPES["digits"] == (digits.input_shape, digits.num_classes)
    mnist = ["data.name=mnist", "student.arch=he_cnn"]
    preflight(load_config(None, mnist))  # CryptoNets' layout: the gather single-sample path fits
    # 32 maps at stride 1 (25,088 features): no ring holds the gather blocks or the diagonal plan.
    wide = [*mnist, "student.channels=[32]", "student.stride=1", "student.padding=2", "student.hidden=[]",
            "compress.structured=0"]
    with pytest.raises(ConfigError, match="single-sample path needs 32768 slots"):
        preflight(load_config(None, wide))
    preflight(load_config(None, [*wide, "encrypt.he.latency_samples=0", "encrypt.he.modes=[encrypted_input]"]))
    preflight(load_config(None, ["student.arch=he_cnn"]))  # digits: 8×8 → 5×3×3, every layout fits
    # A student deeper than the allowed ring holds: one line naming depth, bits and the setting, before training.
    deep = [*mnist, "student.hidden=[64,32,16,16]", "encrypt.he.poly_modulus_degree=8192",
            "encrypt.he.modes=[encrypted_input]", "encrypt.he.latency_samples=0"]
    with pytest.raises(ConfigError, match=r"multiplicative depth 11, .* poly_modulus_degree 8192; set "
                                          r"encrypt.he.poly_modulus_degree to 16384") as error:
        preflight(load_config(None, deep))
    assert "\n" not in str(error.value)
    preflight(load_config(DEFAULT_CONFIG.parent / "cifar10.yaml"))


# --- (e) what has no homomorphic form ------------------------------------------------------------


def test_a_relu_inside_is_refused_naming_it():
    model, _ = _he_cnn()
    model.layers[3] = nn.ReLU()
    with pytest.raises(KdsecError, match=r"^layer 'layers\.3' \(ReLU\) has no homomorphic form; use an HE-friendly"):
        he_ops(model)


class _Residual(nn.Module):
    """Affine layers and x² only, but not applied as a chain: x² of h plus h."""

    def __init__(self):
        super().__init__()
        self.input_shape = (1, 8, 8)
        self.flatten, self.hidden, self.square, self.out = nn.Flatten(), nn.Linear(64, 16), Square(), nn.Linear(16, 10)

    def forward(self, x):
        hidden = self.hidden(self.flatten(x))
        return self.out(self.square(hidden) + hidden)


class _Reordered(_Residual):
    """A chain, but not in the order its layers were registered."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 64)

    def forward(self, x):
        return self.out(self.square(self.hidden(self.first(self.flatten(x)))))


@pytest.mark.parametrize("model", [_Residual(), _Reordered()], ids=["residual", "reordered"])
def test_a_model_that_is_not_a_chain_is_refused(model):
    with pytest.raises(KdsecError, match="^the model is not a plain chain of layers") as caught:
        he_ops(model)
    assert "\n" not in str(caught.value)


def test_a_layer_too_large_to_measure_is_refused_naming_it():
    model = build_model(ModelSpec("he_cnn", (1, 150, 150), 10, {"channels": [1], "hidden": []}))
    with pytest.raises(KdsecError, match=r"^layer 'layers\.0' \(Conv2d\) has 22500 inputs \(1×150×150\), over the "
                                         r"20000 .*student\.pool"):
        he_ops(model)


# --- feature taps for attention / fitnets --------------------------------------------------------


def test_feature_losses_find_the_he_cnn_maps_and_hint():
    model, _ = _he_cnn()
    sample = torch.rand(2, 1, 8, 8)
    assert resolve_tap(model, "auto", "spatial", sample, "student").module == "layers.3"  # x² of the pooled maps
    hint = resolve_tap(model, "auto", "any", sample, "student")
    assert (hint.module, hint.read) == ("layers.7", "input")


def test_a_candidate_whose_single_sample_layout_does_not_fit_skips_that_path_only(monkeypatch, caplog):
    """Preflight checks the smallest candidate; a larger chosen one whose single-sample layout does
    not fit is still encrypted (batched), the single path skipped with a warning: nothing trained is lost."""
    monkeypatch.setattr("kdsec.he.runner.MAX_ROTATIONS", 2)  # the digits he_cnn's plan needs more
    model = build_model(ModelSpec("he_cnn", (1, 8, 8), 10, {"hidden": []})).eval()
    with caplog.at_level("WARNING", logger="kdsec"):
        result = encrypted_inference(model, np.random.default_rng(0).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32),
                                     HEConfig(modes=["encrypted_input"], latency_samples=4))
    assert [(run.mode, run.path) for run in result.runs] == [("encrypted_input", "batched")]
    assert "single-sample path skipped for this candidate" in caplog.text
    monkeypatch.setattr("kdsec.he.runner.MAX_ROTATIONS", 0)  # now nothing with rotations fits...
    with pytest.raises(ConfigError):  # ...and an encrypted model needs rotations: still an error
        encrypted_inference(model, np.zeros((4, 1, 8, 8), np.float32), HEConfig(latency_samples=4))
