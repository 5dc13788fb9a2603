"""Lowering an HE-friendly torch model to the operations every mode evaluates, and what they share.

A student becomes a list of ops (``LinearOp`` with float64 weight and bias, ``SquareOp`` for x²);
an input average pooling is public and linear, so ``he_program`` moves it to the client and
``he_ops`` folds it into the first Linear layer. int8 (``DynamicQuantLinear``) layers are
dequantized; pruned (zero) weights stay zeros for the encrypted-input path to skip.
``plaintext_forward`` is the same arithmetic in float64, the reference decrypted logits are
compared with; ``model_structure`` is what a host may know of the model (shapes, never weights).
Layout helpers the modes share: powers of two, rotation-step ladders, CKKS parameters from a
layout's multiplicative depth (``_params``), samples in ciphertext-sized chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdsec.compress.quantize import DynamicQuantLinear
from kdsec.config import HEConfig
from kdsec.crypto.seal import HEParams, plan_params
from kdsec.errors import KdsecError
from kdsec.models.students import Square


@dataclass(frozen=True)
class LinearOp:
    weight: np.ndarray  # out × in
    bias: np.ndarray


@dataclass(frozen=True)
class SquareOp:
    pass


@dataclass(frozen=True)
class PoolOp:
    """An input average pooling; folded into the first Linear layer (it is linear too)."""

    module: nn.Module


Op = LinearOp | SquareOp


# Students whose every layer has a homomorphic form (Linear, x², input average pooling).
HE_FRIENDLY_ARCHS = ("he_mlp",)


def he_program(model: nn.Module) -> tuple[Callable[[np.ndarray], np.ndarray], list[Op]]:
    """(client-side preprocessing, HE operations). An input average pooling is public and
    linear: the client pools before it encrypts, so the host never touches the full-size input
    (3072 → 192 ciphertexts for 32×32×3 with pool 4)."""
    ops: list[Op] = []
    _collect(model, "", ops)
    if ops and isinstance(ops[0], PoolOp):
        pool, shape = ops.pop(0).module, getattr(model, "input_shape", None)
        if shape is None:
            raise KdsecError("a model with input pooling must record its input_shape")

        def preprocess(inputs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                tensor = torch.as_tensor(np.asarray(inputs, dtype=np.float64).reshape(len(inputs), *shape))
                return pool(tensor).reshape(len(inputs), -1).numpy()
    else:
        def preprocess(inputs: np.ndarray) -> np.ndarray:
            return np.asarray(inputs).reshape(len(inputs), -1)
    _check(ops)
    return preprocess, ops


def he_ops(model: nn.Module) -> list[Op]:
    """The model as a sequence of HE operations on its raw (flattened) input, an input pooling
    folded into the first Linear layer; or an error naming the first layer that has none."""
    ops: list[Op] = []
    _collect(model, "", ops)
    if ops and isinstance(ops[0], PoolOp):
        ops = _fold_pool(ops, getattr(model, "input_shape", None))
    _check(ops)
    return ops


def _check(ops: list) -> None:
    if not ops or not isinstance(ops[0], LinearOp) or not isinstance(ops[-1], LinearOp):
        raise KdsecError("an HE student must start and end with a Linear layer")


def _collect(module: nn.Module, name: str, ops: list[Op]) -> None:
    if isinstance(module, DynamicQuantLinear):
        weight, bias = module._weight_bias()
        ops.append(LinearOp(weight.dequantize().double().numpy(), _bias(bias, weight.shape[0])))
    elif isinstance(module, nn.Linear):
        ops.append(LinearOp(module.weight.detach().cpu().double().numpy(), _bias(module.bias, module.out_features)))
    elif isinstance(module, Square):
        ops.append(SquareOp())
    elif isinstance(module, nn.Flatten):
        pass
    elif isinstance(module, nn.AvgPool2d) and not ops:
        ops.append(PoolOp(module))
    elif children := list(module.named_children()):
        for child_name, child in children:
            _collect(child, f"{name}.{child_name}".lstrip("."), ops)
    else:
        raise KdsecError(f"layer '{name}' ({type(module).__name__}) has no homomorphic form; "
                         "use an HE-friendly student (e.g. student.arch: he_mlp)")


def _fold_pool(ops: list, input_shape: tuple[int, ...] | None) -> list:
    """W · pool(x) = (W · P) · x: the pooling matrix P comes from pooling the identity basis."""
    if input_shape is None or len(ops) < 2 or not isinstance(ops[1], LinearOp):
        raise KdsecError("an input average pooling must be followed by a Linear layer and the model must "
                         "record its input_shape")
    size = int(np.prod(input_shape))
    with torch.no_grad():
        basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
        pooled = ops[0].module(basis).reshape(size, -1).numpy()  # row i: pool(e_i)
    linear = ops[1]
    return [LinearOp(linear.weight @ pooled.T, linear.bias), *ops[2:]]


def _bias(bias, size: int) -> np.ndarray:
    return np.zeros(size) if bias is None else bias.detach().cpu().double().numpy()


def plaintext_forward(ops: list[Op], inputs: np.ndarray) -> np.ndarray:
    """The same arithmetic in float64: the reference the decrypted logits must agree with."""
    values = inputs.reshape(len(inputs), -1).astype(np.float64)
    for op in ops:
        values = values @ op.weight.T + op.bias if isinstance(op, LinearOp) else values * values
    return values


def model_structure(ops: list[Op]) -> list:
    """Layer kinds and shapes: what a host may know of a model (never a weight)."""
    return [["linear", *op.weight.shape] if isinstance(op, LinearOp) else ["square"] for op in ops]


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _doubling(n: int, stride: int = 1, sign: int = 1) -> list[int]:
    """Rotation steps that sum (or spread) a window of pow2(n) slots: stride·1, stride·2, ..."""
    return [sign * stride * (1 << k) for k in range(_pow2(n).bit_length() - 1)]


def _linears(ops: list[Op]) -> list[LinearOp]:
    return [op for op in ops if isinstance(op, LinearOp)]


def _params(config: HEConfig, depth: int, min_slots: int) -> HEParams:
    return plan_params(depth, config.scale_bits, config.integer_bits, config.poly_modulus_degree, min_slots)


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))
