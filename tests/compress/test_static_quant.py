"""Static post-training int8 (torchao PT2E) of a conv student: calibrated, stored as safetensors,
reloaded bit-exactly, ~4× smaller, accuracy kept; in the variant table with its source for FGSM."""

import pytest
import torch

from kdsec.compress import load_weights, weights_format
from kdsec.compress.static_quant import load_static_int8, quantize_static_int8, save_static_int8
from kdsec.config import TrainConfig
from kdsec.errors import IntegrityError
from kdsec.models import ModelSpec, build_model, save_checkpoint
from kdsec.train import accuracy, fit

SPEC = ModelSpec("student_cnn", (1, 8, 8), 10, {"channels": [16, 32], "fc": 64})


@pytest.fixture(scope="module")
def cnn(digits):
    torch.manual_seed(0)
    model = build_model(SPEC)
    fit(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=12, lr=3e-3))
    return model


def test_static_int8_is_smaller_keeps_accuracy_and_reloads_bit_exactly(cnn, digits, tmp_path):
    program = quantize_static_int8(cnn, digits.x_train[:256])
    path = save_static_int8(program, SPEC, tmp_path / "static_int8.safetensors")
    fp32 = save_checkpoint(cnn, SPEC, tmp_path / "fp32.safetensors")
    assert path.stat().st_size < 0.35 * fp32.stat().st_size  # int8 weights + per-channel scales, headers
    assert weights_format(path) == "int8_static"
    reference, spec = load_static_int8(path, lower=False)
    assert spec == SPEC
    inputs = torch.as_tensor(digits.x_test)
    with torch.no_grad():
        assert torch.equal(program(inputs), reference(inputs))
    assert accuracy(reference, digits.x_test, digits.y_test) >= accuracy(cnn, digits.x_test, digits.y_test) - 0.01
    # int8 weights really are int8 in the file, and activations really are quantized in the program
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys() if "frozen_param" in k}
        assert dtypes == {torch.int8}
        assert handle.get_tensor("activation_qparams").shape[0] >= 4


def test_loading_lowers_to_onednn_int8_kernels_with_the_reference_numbers(cnn, digits, tmp_path):
    program = quantize_static_int8(cnn, digits.x_train[:256])
    path = save_static_int8(program, SPEC, tmp_path / "static_int8.safetensors")
    lowered, spec, fmt = load_weights(path)  # what serving, the audit and the variant table use
    assert spec == SPEC and fmt == "int8_static"
    targets = {str(node.target) for node in lowered.graph.nodes if node.op == "call_function"}
    assert {"onednn.qconv_pointwise.default", "onednn.qlinear_pointwise.default"} <= targets
    assert lowered.cpu().eval() is lowered
    with torch.no_grad():
        for batch in (1, 7, len(digits.x_test)):  # the batch dimension stays dynamic
            inputs = torch.as_tensor(digits.x_test[:batch])
            expected, got = program(inputs), lowered(inputs)
            assert got.shape == expected.shape
            # fused requantization rounds differently from q→dq→float op: a few output steps at most
            assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    same = (lowered(torch.as_tensor(digits.x_test)).argmax(1) == program(torch.as_tensor(digits.x_test)).argmax(1))
    assert same.float().mean() >= 0.99


def test_resnet_with_batchnorm_and_residual_adds_quantizes_and_reloads(digits, tmp_path):
    spec = ModelSpec("resnet18", (1, 8, 8), 10, {"width": 8})
    torch.manual_seed(0)
    resnet = build_model(spec)
    fit(resnet, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=4, lr=3e-3))
    path = save_static_int8(quantize_static_int8(resnet, digits.x_train[:256]), spec, tmp_path / "r.safetensors")
    lowered, _, _ = load_weights(path)
    targets = {str(node.target) for node in lowered.graph.nodes if node.op == "call_function"}
    assert "onednn.qconv2d_pointwise.binary" in targets  # conv + residual add + ReLU as one int8 kernel
    assert accuracy(lowered, digits.x_test, digits.y_test) >= accuracy(resnet, digits.x_test, digits.y_test) - 0.03


def test_tampered_static_file_is_rejected(cnn, digits, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_static_int8(quantize_static_int8(cnn, digits.x_train[:64]), SPEC, tmp_path / "s.safetensors")
    tensors = load_file(str(path))
    tensors.pop("activation_qparams")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"kdsec.spec": SPEC.to_json(),
                                                                     "kdsec.int8_static": "{}"})
    with pytest.raises(IntegrityError, match="does not match the student_cnn int8 program"):
        load_static_int8(tmp_path / "bad.safetensors")


def test_compress_adds_static_variants_for_conv_students(cnn, digits, tmp_path):
    from kdsec import roles
    from kdsec import trainers
    from kdsec.compress import candidates
    from kdsec.config import CompressConfig

    checkpoint = save_checkpoint(cnn, SPEC, tmp_path / "student.safetensors")
    student = trainers.TrainedModel("kd_student", str(checkpoint), SPEC.to_json(), 0.9, 0.9, 1, 1, 1, 1.0)
    variants = candidates.compress_student(CompressConfig(finetune_epochs=1, latency_repeats=3, structured=0.5),
                                       digits, student, TrainConfig(epochs=1), 0, tmp_path)
    names = [v.name for v in variants]
    assert names == ["dense", "pruned50", "pruned50_static_int8", "pruned50_int8", "structured50",
                     "structured50_static_int8", "structured50_int8", "static_int8"]
    static = {v.name: v for v in variants if "static" in v.name}
    assert static["static_int8"].size_bytes < 0.35 * variants[0].size_bytes
    assert static["structured50_static_int8"].flops < variants[0].flops
    assert roles.variant_source("variant:structured50_static_int8") == "variant:structured50"
    assert roles.variant_source("variant:static_int8") == "kd_student"
