"""Lowering an HE-friendly torch model to the operations every mode evaluates, and what they share.

A student becomes a list of ops (``LinearOp`` with float64 weight and bias, ``SquareOp`` for x²).
The model is read as the chain of its leaf layers (checked against its own forward pass), and
every maximal run of affine layers — Linear, int8 ``DynamicQuantLinear`` (dequantized), Conv2d,
average pooling, BatchNorm (eval), Flatten, Identity, Dropout (eval) — is composed into ONE
``LinearOp``: a convolution becomes a sparse matrix, BatchNorm is folded in before encryption.
The leading parameter-free layers (an input average pooling) are public: ``he_program`` moves
them to the client, ``he_ops`` folds them into the first Linear map. Pruned (zero) weights stay
zeros for the encrypted-input path to skip.
``plaintext_forward`` is the same arithmetic in float64, the reference decrypted logits are
compared with; ``model_structure`` is what a host may know of the model (shapes, never weights).
Layout helpers the modes share: powers of two, rotation-step ladders, CKKS parameters from a
layout's multiplicative depth (``he_params``), samples in ciphertext-sized chunks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from kdsec.compress.quantize import DynamicQuantLinear
from kdsec.he.ops import (LinearOp, Op, SquareOp, alternates, batched_params, doubling_steps,  # noqa: F401
                                 he_params, largest_ring, linear_ops, model_structure, next_pow2,
                                 plaintext_forward, sample_chunks)
from kdsec.errors import KdsecError
from kdsec.models.students import Square


# Students whose every layer has a homomorphic form (affine layers and x²).
HE_FRIENDLY_ARCHS = ("he_mlp", "he_cnn")

# Layers that are affine maps of their input in eval mode: a run of them is one Linear map.
AFFINE = (nn.Linear, DynamicQuantLinear, nn.Conv2d, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten,
          nn.Identity, nn.Dropout)
# Affine layers that leave the (flattened) values as they are.
RESHAPES = (nn.Flatten, nn.Identity, nn.Dropout)
# Parameter-free layers a client may apply itself, before it encrypts: public preprocessing.
PUBLIC = (nn.AvgPool2d, *RESHAPES)
# Layers measured on the identity basis of their input cost an (outputs × inputs) float64 matrix:
# 3×32×32 inputs are 3072 columns (75 MB per 3072 outputs); past this many inputs they are refused.
MAX_BASIS_INPUTS = 20_000
_BASIS_CHUNK = 512  # basis vectors evaluated at once
MAX_MEASURED_BYTES = 4 << 30  # a measured map's float64 matrix, built and transposed once


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    input_shape: tuple[int, ...]  # of one sample


def he_program(model: nn.Module) -> tuple[Callable[[np.ndarray], np.ndarray], list[Op]]:
    """(client-side preprocessing, HE operations). The leading parameter-free layers (an input
    average pooling) are public and linear: the client applies them before it encrypts, so the
    host never touches the full-size input (3072 → 192 ciphertexts for 32×32×3 with pool 4)."""
    layers = _chain(model)
    public = next((i for i, layer in enumerate(layers) if not isinstance(layer.module, PUBLIC)), len(layers))
    ops = _with_support(_lower(layers[public:]), layers[public:])
    _check(ops)
    client = [layer for layer in layers[:public] if not isinstance(layer.module, RESHAPES)]
    if not client:
        def preprocess(inputs: np.ndarray) -> np.ndarray:
            return np.asarray(inputs).reshape(len(inputs), -1)
        return preprocess, ops
    shape, modules = client[0].input_shape, [_float64(layer.module) for layer in client]

    def preprocess(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            values = torch.as_tensor(np.asarray(inputs, dtype=np.float64).reshape(len(inputs), *shape))
            for module in modules:
                values = module(values)
            return values.reshape(len(inputs), -1).numpy()
    return preprocess, ops


def he_ops(model: nn.Module) -> list[Op]:
    """The model as a sequence of HE operations on its raw (flattened) input, an input pooling
    folded into the first Linear map; or an error naming the first layer that has none."""
    layers = _chain(model)
    ops = _with_support(_lower(layers), layers)
    _check(ops)
    return ops


def _with_support(ops: list[Op], layers: list[_Layer]) -> list[Op]:
    """``ops`` with the first op's structural support: the non-zeros of the same layers lowered
    with every weight 1 and every bias 0 (a sum of positive terms cannot cancel), so pruned
    weights stay as private as the others."""
    if not ops or not isinstance(ops[0], LinearOp):
        return ops
    first = []
    for layer in layers:
        if isinstance(layer.module, Square):
            break
        first.append(_Layer(layer.name, _ones(layer.module), layer.input_shape))
    (structural, *_) = _lower(first)
    return [replace(ops[0], support=structural.weight != 0), *ops[1:]]


def _ones(module: nn.Module) -> nn.Module:
    """A float64 copy of an affine layer with every weight 1 and every bias 0 (BatchNorm: the identity)."""
    if isinstance(module, DynamicQuantLinear):
        module = nn.Linear(module.in_features, module.out_features)
    module = _float64(module)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.fill_(0.0 if name.endswith("bias") else 1.0)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_mean is not None:
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
    return module


def _check(ops: list) -> None:
    if not ops or not isinstance(ops[0], LinearOp) or not isinstance(ops[-1], LinearOp):
        raise KdsecError("an HE student must start and end with a Linear layer")


def _leaves(module: nn.Module, name: str = "") -> list[tuple[str, nn.Module]]:
    """Every leaf layer (an int8 Linear counts as one), in registration order."""
    children = list(module.named_children())
    if isinstance(module, DynamicQuantLinear) or not children:
        return [(name or type(module).__name__, module)]
    return [leaf for child_name, child in children for leaf in _leaves(child, f"{name}.{child_name}".lstrip("."))]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm and Dropout as inference runs them; each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _chain(model: nn.Module) -> list[_Layer]:
    """The model's leaf layers with each one's input shape, once each has a homomorphic form and
    applying them in order is checked (on a random input) to be the model's own forward pass."""
    leaves = _leaves(model)
    for name, module in leaves:
        if not isinstance(module, (Square, *AFFINE)):
            raise KdsecError(f"layer '{name}' ({type(module).__name__}) has no homomorphic form; "
                             "use an HE-friendly student (e.g. student.arch: he_mlp or he_cnn)")
    shape = getattr(model, "input_shape", None)
    if shape is None and isinstance(leaves[0][1], (nn.Linear, DynamicQuantLinear)):
        shape = (leaves[0][1].in_features,)
    if shape is None:
        raise KdsecError(f"the {type(model).__name__} model must record its input_shape to run under HE")
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype, device = (parameter.dtype, parameter.device) if parameter is not None else (torch.float32, "cpu")
    sample = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = sample.to(device, dtype)
    shapes = []
    with _eval_mode(model), torch.no_grad():
        try:
            for _, module in leaves:
                shapes.append(tuple(values.shape[1:]))
                values = module(values)
            expected = model(sample.to(device, dtype))
            chain = values.shape == expected.shape and torch.allclose(values, expected, rtol=1e-5, atol=1e-6)
        except (RuntimeError, ValueError):
            chain = False
    if not chain:
        raise KdsecError(f"the model is not a plain chain of layers: its forward pass is not its {len(leaves)} leaf "
                         "layers applied in order, so it cannot be lowered to HE operations")
    return [_Layer(name, module, layer_shape) for (name, module), layer_shape in zip(leaves, shapes)]


def _lower(layers: list[_Layer]) -> list[Op]:
    """x² → ``SquareOp``; each maximal run of affine layers → one ``LinearOp`` (W₂W₁, W₂b₁ + b₂).
    Linear layers compose from their weights exactly; the layers between them (convolutions,
    poolings, BatchNorm) are measured together, as one map, on the basis of their input."""
    ops: list[Op] = []
    run: tuple[np.ndarray, np.ndarray] | None = None  # the affine run so far (None: nothing yet)
    measured: list[_Layer] = []  # consecutive non-Linear affine layers not yet in ``run``

    def extend(weight: np.ndarray, bias: np.ndarray) -> None:
        nonlocal run
        run = (weight, bias) if run is None else (weight @ run[0], weight @ run[1] + bias)

    def flush() -> None:
        if any(not isinstance(layer.module, RESHAPES) for layer in measured):
            extend(*_measured(measured))
        measured.clear()

    for layer in layers:
        if isinstance(layer.module, (nn.Linear, DynamicQuantLinear)):
            flush()
            extend(*_linear(layer))
        elif isinstance(layer.module, Square):
            flush()
            if run is not None:
                ops.append(LinearOp(*run))
                run = None
            ops.append(SquareOp())
        else:
            measured.append(layer)
    flush()
    if run is not None:
        ops.append(LinearOp(*run))
    return ops


def _linear(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a Linear (or dequantized int8 Linear) layer on flattened values, exactly: one
    copy of W per row of a multi-dimensional input."""
    module = layer.module
    if isinstance(module, DynamicQuantLinear):
        quantized, bias = module._weight_bias()
        weight, bias = quantized.dequantize().double().numpy(), _bias(bias, quantized.shape[0])
    else:
        weight, bias = module.weight.detach().cpu().double().numpy(), _bias(module.bias, module.out_features)
    rows = math.prod(layer.input_shape[:-1])
    return (weight, bias) if rows == 1 else (np.kron(np.eye(rows), weight), np.tile(bias, rows))


def _measured(layers: list[_Layer]) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive affine layers f as one matrix: b = f(0), column i = f(e_i) − b, evaluated on a
    float64 copy, a chunk of basis vectors at a time. The matrix is (outputs × inputs) float64
    (3×32×32 inputs: 3072 columns, 75 MB per 3072 outputs); past ``MAX_BASIS_INPUTS`` inputs the
    layer is refused."""
    shape, size = layers[0].input_shape, math.prod(layers[0].input_shape)
    if size > MAX_BASIS_INPUTS:
        raise KdsecError(f"layer '{layers[0].name}' ({type(layers[0].module).__name__}) has {size} inputs "
                         f"({'×'.join(map(str, shape))}), over the {MAX_BASIS_INPUTS} its HE form can be measured "
                         "on; pool the input first (student.pool) or use a smaller input")
    module = nn.Sequential(*(_float64(layer.module) for layer in layers))
    with torch.no_grad():
        bias = module(torch.zeros(1, *shape, dtype=torch.float64)).reshape(-1)
        if 2 * 8 * len(bias) * size > MAX_MEASURED_BYTES:  # the columns, then their transpose
            raise KdsecError(f"layer '{layers[0].name}' ({type(layers[0].module).__name__}) maps {size} inputs to "
                             f"{len(bias)} outputs: its HE form would take {16 * len(bias) * size / 2**30:.1f} GiB "
                             "to measure; use fewer channels, a larger stride or pool the input (student.pool)")
        columns = []
        for chunk in sample_chunks(size, _BASIS_CHUNK):
            basis = torch.zeros(chunk.stop - chunk.start, size, dtype=torch.float64)
            basis[torch.arange(len(basis)), torch.arange(chunk.start, chunk.stop)] = 1.0
            columns.append(module(basis.reshape(-1, *shape)).reshape(len(basis), -1) - bias)
    return torch.cat(columns).T.contiguous().numpy(), bias.numpy()


def _float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).cpu().double().eval()


def _bias(bias, size: int) -> np.ndarray:
    return np.zeros(size) if bias is None else bias.detach().cpu().double().numpy()
