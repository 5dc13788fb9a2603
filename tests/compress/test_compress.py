import pytest
import torch

from kdsec.compress import (global_magnitude_prune, load_int8, measure_variant, prunable_parameters,
                            quantize_dynamic_int8, save_int8)
from kdsec.config import TrainConfig
from kdsec.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from kdsec.train import accuracy, fit

SPEC = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [32]})


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = build_model(SPEC)
    fit(model, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=30, lr=3e-3))
    return model


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_pruning_reaches_exactly_the_requested_sparsity_and_is_permanent(trained, digits, tmp_path, sparsity):
    model, _ = _copy(trained, tmp_path)
    finetune = TrainConfig(epochs=3, lr=1e-3)
    global_magnitude_prune(model, sparsity, lambda m: fit(m, digits.x_train, digits.y_train, digits.x_val,
                                                          digits.y_val, finetune))
    weights = [module.weight for module, _ in prunable_parameters(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(sparsity * total)
    state = model.state_dict()
    assert not any(key.endswith(("weight_orig", "weight_mask")) for key in state)
    reloaded, _ = load_checkpoint(save_checkpoint(model, SPEC, tmp_path / "pruned.safetensors"))
    assert sum(int((m.weight == 0).sum()) for m, _ in prunable_parameters(reloaded)) == zeros


def test_iterative_schedule_prunes_in_rounds_and_fine_tunes_after_each(trained, digits, tmp_path):
    from kdsec.compress.prune import sparsity_schedule

    assert sparsity_schedule(0.8, 3) == pytest.approx([0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - (1 / 3) ** 3), 0.8])
    model, _ = _copy(trained, tmp_path)
    levels = []

    def finetune(m):
        weights = [module.weight for module, _ in prunable_parameters(m)]  # masked view while pruning
        levels.append(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
        fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=2, lr=1e-3))

    global_magnitude_prune(model, 0.8, finetune, steps=3)
    assert levels == pytest.approx(sparsity_schedule(0.8, 3), abs=1e-3)
    weights = [module.weight for module, _ in prunable_parameters(model)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    assert accuracy(model, digits.x_test, digits.y_test) > 0.8


def test_int8_round_trips_bit_exactly_and_is_smaller(trained, digits, tmp_path):
    quantized = quantize_dynamic_int8(_copy(trained, tmp_path)[0])
    path = save_int8(quantized, SPEC, tmp_path / "int8.safetensors")
    reloaded, spec = load_int8(path)
    assert spec == SPEC
    with torch.inference_mode():
        inputs = torch.as_tensor(digits.x_test)
        assert torch.equal(quantized(inputs), reloaded(inputs))
    dense_path = save_checkpoint(trained, SPEC, tmp_path / "dense.safetensors")
    assert path.stat().st_size < 0.35 * dense_path.stat().st_size
    assert accuracy(reloaded, digits.x_test, digits.y_test) >= accuracy(trained, digits.x_test, digits.y_test) - 0.02


def test_measure_variant_reports_what_is_on_disk(trained, digits, tmp_path):
    path = save_checkpoint(trained, SPEC, tmp_path / "dense.safetensors")
    metrics = measure_variant("dense", trained, path, digits, repeats=3)
    assert metrics.params == sum(p.numel() for p in trained.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
    assert metrics.size_bytes == path.stat().st_size
    assert metrics.latency_ms > 0
    assert metrics.test_accuracy == pytest.approx(accuracy(trained, digits.x_test, digits.y_test))
    assert metrics.val_accuracy == pytest.approx(accuracy(trained, digits.x_val, digits.y_val))


def _variant(name: str, size_bytes: int, val_accuracy: float, test_accuracy: float):
    from kdsec.compress.measure import VariantMetrics

    return VariantMetrics(name=name, checkpoint=f"{name}.safetensors", test_accuracy=test_accuracy,
                          val_accuracy=val_accuracy, params=100, nonzero_params=100, size_bytes=size_bytes,
                          latency_ms=0.1)


def test_the_candidate_is_chosen_on_validation_accuracy_never_on_test_accuracy():
    from kdsec.compress.candidates import select_candidate
    from kdsec.config import GatesConfig

    # Test accuracy flatters the smallest variant and hides the middle one's weakness: a rule that
    # looked at it would choose on the very number the accuracy gate then reads.
    variants = [_variant("dense", 1000, val_accuracy=0.97, test_accuracy=0.97),
                _variant("mid", 500, val_accuracy=0.96, test_accuracy=0.94),
                _variant("small", 200, val_accuracy=0.93, test_accuracy=0.99)]
    gates = GatesConfig(min_accuracy=0.95, max_drop=0.03)
    # floor: max(0.95, teacher's validation accuracy 0.97 - 0.03) = 0.95, met on validation by mid, not small
    assert select_candidate(variants, 0.97, gates, "smallest_passing").name == "mid"
    assert select_candidate(variants, 0.995, gates, "smallest_passing").name == "dense"  # floor 0.965
    assert select_candidate(variants, 0.97, GatesConfig(min_accuracy=0.99), "smallest_passing").name == "dense"
    assert select_candidate(variants, 0.97, gates, "most_accurate").name == "dense"


def _copy(model, tmp_path):
    return load_checkpoint(save_checkpoint(model, SPEC, tmp_path / "copy.safetensors"))


@pytest.mark.parametrize("structured_epochs", [0, 3])
def test_structured_variant_fine_tunes_by_its_own_setting_even_with_mask_fine_tuning_off(
        trained, digits, tmp_path, structured_epochs):
    from kdsec import trainers
    from kdsec.compress import candidates
    from kdsec.compress import structured_prune
    from kdsec.config import CompressConfig

    checkpoint = save_checkpoint(trained, SPEC, tmp_path / "student.safetensors")
    student = trainers.TrainedModel("kd_student", str(checkpoint), SPEC.to_json(), 0.9, 0.9, 1, 1, 1, 1.0)
    config = CompressConfig(sparsity=0.0, structured=0.5, finetune_epochs=0,
                            structured_finetune_epochs=structured_epochs, quantize=False, latency_repeats=3)
    variants = {v.name: v for v in candidates.compress_student(config, digits, student, TrainConfig(), 0, tmp_path)}
    assert list(variants) == ["dense", "structured50"]
    shipped = candidates.load_variant(variants["structured50"]).state_dict()
    untuned = structured_prune(load_checkpoint(checkpoint)[0], SPEC, 0.5)[0].state_dict()
    changed = any(not torch.equal(shipped[name], untuned[name]) for name in untuned)
    assert changed == (structured_epochs > 0)
