"""Int8 dynamic quantization of Linear layers, stored as safetensors (int8 weights + scales).

PyTorch's dynamic quantization packs weights in objects that only pickle can serialize; we
store the int8 values, scale and zero point of each layer in safetensors instead and rebuild
the exact same quantized model on load.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from kdsec.errors import IntegrityError
from kdsec.fileio import PRIVATE, write_atomic
from kdsec.models.catalog import build_model
from kdsec.models.checkpoint import load_checkpoint, read_kdsec_file
from kdsec.models.spec import ModelSpec

# torch.ao.quantization's eager API warns that it is deprecated in favour of torchao; its dynamic
# Linear path is still the one that runs int8 GEMMs on CPU with no extra dependency.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
    from torch.ao.quantization import quantize_dynamic


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (on CPU) whose Linear layers run with int8 weights and dynamically
    quantized activations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.cpu().eval(), {nn.Linear}, dtype=torch.qint8, inplace=False)


def _quantized_layers(model: nn.Module) -> dict[str, DynamicQuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, DynamicQuantLinear)}


def save_int8(quantized: nn.Module, spec: ModelSpec, path: Path) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    qparams: dict[str, list[float]] = {}
    for name, layer in _quantized_layers(quantized).items():
        weight, bias = layer._weight_bias()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
        qparams[name] = [float(weight.q_scale()), int(weight.q_zero_point())]
    # Layers that stayed float (e.g. convolutions) are kept as they are.
    quantized_names = set(qparams)
    for name, tensor in quantized.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if isinstance(tensor, torch.Tensor) and not tensor.is_quantized and not any(
            owner == q or owner.startswith(q + ".") for q in quantized_names):
            tensors[name] = tensor.detach().contiguous()
    return write_atomic(path, save(tensors, metadata={"kdsec.spec": spec.to_json(), "kdsec.int8": json.dumps(qparams)}),
                        mode=PRIVATE)


def load_int8(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the dynamically quantized model bit-exactly from ``save_int8`` output."""
    spec, metadata, tensors = read_kdsec_file(path, "a kdsec int8 checkpoint")
    try:
        qparams = json.loads(metadata["kdsec.int8"])
    except (KeyError, ValueError) as exc:
        raise IntegrityError(f"'{path}' is not a kdsec int8 checkpoint ({exc})") from None
    float_model = build_model(spec)
    float_state = {key: value for key, value in tensors.items() if not key.endswith("weight_int8")}
    float_model.load_state_dict(float_state, strict=False)
    quantized = quantize_dynamic_int8(float_model)
    for name, layer in _quantized_layers(quantized).items():
        scale, zero_point = qparams[name]
        weight = torch._make_per_tensor_quantized_tensor(tensors[f"{name}.weight_int8"], scale, int(zero_point))
        layer.set_weight_bias(weight, tensors.get(f"{name}.bias"))
    return quantized.eval(), spec


def weights_format(path: Path) -> str:
    """'int8' for a ``save_int8`` file, 'int8_static' for a ``save_static_int8`` one, 'float' for a plain checkpoint (read from the file's metadata)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, ValueError, SafetensorError) as exc:
        raise IntegrityError(f"'{path}' is not a safetensors checkpoint ({exc})") from None
    if "kdsec.spec" not in metadata:
        raise IntegrityError(f"'{path}' is not a kdsec checkpoint (no kdsec.spec metadata)")
    if "kdsec.int8_static" in metadata:
        return "int8_static"
    return "int8" if "kdsec.int8" in metadata else "float"


def load_weights(path: Path) -> tuple[nn.Module, ModelSpec, str]:
    """Any kdsec checkpoint, float or int8, with its spec and format."""
    from kdsec.compress.static_quant import load_static_int8

    weight_format = weights_format(path)
    loader = {"int8": load_int8, "int8_static": load_static_int8}.get(weight_format, load_checkpoint)
    model, spec = loader(path)
    return model, spec, weight_format


def dequantized_copy(quantized: nn.Module, spec: ModelSpec) -> nn.Module:
    """A float model with the int8 weights dequantized: a differentiable stand-in (e.g. to craft
    adversarial examples for an int8 model, whose ops have no gradients)."""
    model = build_model(spec)
    state = {key: value for key, value in quantized.state_dict().items()
             if isinstance(value, torch.Tensor) and not value.is_quantized}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, layer in _quantized_layers(quantized).items():
            weight, bias = layer._weight_bias()
            target = model.get_submodule(name)
            target.weight.copy_(weight.dequantize())
            if bias is not None:
                target.bias.copy_(bias)
    return model.eval()
