"""CKKS (TenSEAL) inference of HE-friendly students on encrypted inputs.

Layout: one ciphertext per *input feature*, its slots holding that feature for up to N/2
samples (CryptoNets-style batching). A Linear layer is then a weighted sum of ciphertexts with
plaintext scalar weights (no rotations, no Galois keys) and x² is one ciphertext product, so
the cost is amortized over every sample in the slots. Zero weights (pruned) are skipped.

Roles: the client (key holder) creates the context, encrypts inputs and decrypts logits; the
server receives only the serialized *public* context (no secret key) and ciphertexts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import torch
from torch import nn

from kdsec.compress.quantize import DynamicQuantLinear
from kdsec.config import HEConfig
from kdsec.errors import ConfigError, KdsecError
from kdsec.models.students import Square

# Largest total coefficient-modulus bits per ring degree at 128-bit security (HE standard, as in SEAL).
MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class LinearOp:
    weight: np.ndarray  # out × in
    bias: np.ndarray


@dataclass(frozen=True)
class SquareOp:
    pass


Op = LinearOp | SquareOp


def he_ops(model: nn.Module) -> list[Op]:
    """The model as a sequence of HE operations, or an error naming the first layer that has none."""
    ops: list[Op] = []
    _collect(model, "", ops)
    return ops


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
    elif children := list(module.named_children()):
        for child_name, child in children:
            _collect(child, f"{name}.{child_name}".lstrip("."), ops)
    else:
        raise KdsecError(f"layer '{name}' ({type(module).__name__}) has no homomorphic form; "
                         "use an HE-friendly student (e.g. student.arch: he_mlp)")


def _bias(bias, size: int) -> np.ndarray:
    return np.zeros(size) if bias is None else bias.detach().cpu().double().numpy()


def multiplicative_depth(ops: list[Op]) -> int:
    """Rescales needed: one per Linear (scalar products) and one per x²."""
    return len(ops)


@dataclass(frozen=True)
class HEParams:
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


def plan_params(depth: int, config: HEConfig) -> HEParams:
    """Coefficient moduli for ``depth`` rescales, checked against the 128-bit security bound."""
    bits = (config.outer_bits, *([config.scale_bits] * depth), config.outer_bits)
    limit = MAX_MODULUS_BITS[config.poly_modulus_degree]
    if sum(bits) > limit:
        fitting = [n for n, cap in sorted(MAX_MODULUS_BITS.items()) if sum(bits) <= cap]
        hint = (f"set encrypt.he.poly_modulus_degree to {fitting[0]}" if fitting
                else "no secure ring is large enough: use a shallower student or lower encrypt.he.scale_bits")
        raise ConfigError(f"the student needs multiplicative depth {depth}, i.e. {sum(bits)} modulus bits, over the "
                          f"128-bit security bound of {limit} bits for poly_modulus_degree "
                          f"{config.poly_modulus_degree}; {hint}")
    return HEParams(config.poly_modulus_degree, bits, config.scale_bits)


class HEClient:
    """The key holder: owns the secret key, encrypts inputs, decrypts outputs."""

    def __init__(self, params: HEParams) -> None:
        self.params = params
        self.context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                                  coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
        self.context.global_scale = 2**params.scale_bits
        self.context.generate_relin_keys()

    def public_context(self) -> bytes:
        """What the server gets: encryption and relinearization keys, never the secret key."""
        return self.context.serialize(save_public_key=True, save_secret_key=False,
                                      save_galois_keys=False, save_relin_keys=True)

    def encrypt(self, inputs: np.ndarray) -> list[bytes]:
        """One serialized ciphertext per feature; ``len(inputs)`` must fit the slots."""
        features = inputs.reshape(len(inputs), -1).astype(np.float64)
        if len(features) > self.params.slots:
            raise ValueError(f"{len(features)} samples exceed the {self.params.slots} slots of one ciphertext")
        return [ts.ckks_vector(self.context, column).serialize() for column in features.T]

    def decrypt(self, outputs: list[bytes], count: int) -> np.ndarray:
        columns = [ts.ckks_vector_from(self.context, blob).decrypt()[:count] for blob in outputs]
        return np.stack(columns, axis=1)


class HEServer:
    """The host: evaluates the plaintext model on encrypted inputs with a public context only."""

    def __init__(self, public_context: bytes, ops: list[Op]) -> None:
        self.context = ts.context_from(public_context)
        if self.context.has_secret_key():
            raise KdsecError("the server was handed a context with a secret key; send public_context() only")
        self.ops = ops

    def infer(self, encrypted_features: list[bytes]) -> list[bytes]:
        values = [ts.ckks_vector_from(self.context, blob) for blob in encrypted_features]
        for op in self.ops:
            values = _linear(values, op) if isinstance(op, LinearOp) else [v * v for v in values]
        return [value.serialize() for value in values]


def _linear(inputs: list[ts.CKKSVector], op: LinearOp) -> list[ts.CKKSVector]:
    outputs = []
    for row, bias in zip(op.weight, op.bias):
        terms = [inputs[i] * float(w) for i, w in enumerate(row) if w != 0.0]
        if not terms:  # a fully pruned neuron: its output is the bias alone
            terms = [inputs[0] * 0.0]
        total = terms[0]
        for term in terms[1:]:
            total += term
        outputs.append(total + float(bias))
    return outputs


@dataclass(frozen=True)
class HEResult:
    samples: int
    agreement: float  # argmax of decrypted logits == argmax of the same arithmetic in plaintext
    agreement_with_model: float  # ... == the deployed (e.g. int8) model's own prediction
    max_abs_logit_error: float
    ms_per_sample: float
    server_ms_per_sample: float
    ciphertext_bytes_in: int
    ciphertext_bytes_out: int
    public_context_bytes: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    server_had_secret_key: bool


def _batches(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def encrypted_inference(model: nn.Module, inputs: np.ndarray, config: HEConfig) -> tuple[np.ndarray, HEResult]:
    """Run the full client → server → client round trip on ``inputs``; compare with plaintext."""
    ops = he_ops(model)
    params = plan_params(multiplicative_depth(ops), config)
    client = HEClient(params)
    server = HEServer(client.public_context(), ops)
    started = time.perf_counter()
    server_seconds = 0.0
    bytes_in = bytes_out = 0
    logits = []
    for batch in _batches(len(inputs), params.slots):
        encrypted = client.encrypt(inputs[batch])
        server_started = time.perf_counter()
        outputs = server.infer(encrypted)
        server_seconds += time.perf_counter() - server_started
        bytes_in += sum(map(len, encrypted))
        bytes_out += sum(map(len, outputs))
        logits.append(client.decrypt(outputs, batch.stop - batch.start))
    elapsed = time.perf_counter() - started
    encrypted_logits = np.concatenate(logits)
    plain_logits = _plaintext_forward(ops, inputs)
    with torch.inference_mode():
        model_predictions = model.cpu().eval()(torch.as_tensor(inputs)).argmax(1).numpy()
    result = HEResult(
        samples=len(inputs),
        agreement=float((encrypted_logits.argmax(1) == plain_logits.argmax(1)).mean()),
        agreement_with_model=float((encrypted_logits.argmax(1) == model_predictions).mean()),
        max_abs_logit_error=float(np.abs(encrypted_logits - plain_logits).max()),
        ms_per_sample=1e3 * elapsed / len(inputs),
        server_ms_per_sample=1e3 * server_seconds / len(inputs),
        ciphertext_bytes_in=bytes_in,
        ciphertext_bytes_out=bytes_out,
        public_context_bytes=len(client.public_context()),
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=params.coeff_mod_bit_sizes,
        scale_bits=params.scale_bits,
        server_had_secret_key=server.context.has_secret_key(),
    )
    return encrypted_logits, result


def _plaintext_forward(ops: list[Op], inputs: np.ndarray) -> np.ndarray:
    """The same arithmetic in float64, the reference the encrypted result must agree with."""
    values = inputs.reshape(len(inputs), -1).astype(np.float64)
    for op in ops:
        values = values @ op.weight.T + op.bias if isinstance(op, LinearOp) else values * values
    return values


