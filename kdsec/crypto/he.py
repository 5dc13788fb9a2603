"""CKKS inference of HE-friendly students (Linear layers and x²) in two protection modes.

**Encrypted input** (the host holds the plaintext model and a public context; the client's data
stays encrypted), two paths:

- *batched*: one ciphertext per input feature, its slots holding that feature for up to N/2
  samples (CryptoNets). A Linear layer is a weighted sum of ciphertexts with plaintext scalars,
  rescaled once per neuron; zero (pruned) weights, and neurons nothing downstream reads, are
  skipped. No rotations.
- *single*: one sample in one ciphertext laid out as an R×C grid, x copied into every row.
  Linear layers alternate between reducing along a row (result in column 0) and along a column
  (result in row 0); each is one plaintext product plus log2 rotations, so latency does not grow
  with the number of weights.

**Encrypted model** (the owner encrypts the weights; the host computes on its plaintext inputs
and can read neither the weights nor the logits): samples in blocks of B slots. The first layer
is plaintext-input × encrypted-weight-column sums; later layers are ciphertext products with
encrypted weight rows followed by a rotate-and-sum inside each block. Zero weights are *not*
skipped in this mode: skipping them would show the host the sparsity pattern.

Encryption parameters come from the layout's multiplicative depth (``plan_params``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdsec.compress.quantize import DynamicQuantLinear
from kdsec.config import HEConfig
from kdsec.crypto.seal import HEParams, KeyHolder, PublicContext, pack, plan_params, scratch, unpack
from kdsec.errors import KdsecError
from kdsec.fileio import write_atomic
from kdsec.models.students import Square

@dataclass(frozen=True)
class LinearOp:
    weight: np.ndarray  # out × in
    bias: np.ndarray


@dataclass(frozen=True)
class SquareOp:
    pass


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


@dataclass(frozen=True)
class PoolOp:
    """An input average pooling; folded into the first Linear layer (it is linear too)."""

    module: nn.Module


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


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _doubling(n: int, stride: int = 1, sign: int = 1) -> list[int]:
    """Rotation steps that sum (or spread) a window of pow2(n) slots: stride·1, stride·2, ..."""
    return [sign * stride * (1 << k) for k in range(_pow2(n).bit_length() - 1)]


def _linears(ops: list[Op]) -> list[LinearOp]:
    return [op for op in ops if isinstance(op, LinearOp)]


def _params(config: HEConfig, depth: int, min_slots: int) -> HEParams:
    return plan_params(depth, config.scale_bits, config.integer_bits, config.poly_modulus_degree, min_slots)


# --- encrypted input, batched ----------------------------------------------------------------


def _live_inputs(ops: list[Op]) -> list[np.ndarray]:
    """For each op, which of its input values anything downstream reads (backward liveness)."""
    needed = np.ones(len(ops[-1].bias), dtype=bool)
    live: list[np.ndarray] = []
    for op in reversed(ops):
        if isinstance(op, LinearOp):
            needed = (op.weight[needed] != 0).any(axis=0)
        live.append(needed)
    return live[::-1]


class BatchedServer:
    """Encrypted-input host, batched path: plaintext model, public context, no secret key."""

    def __init__(self, public: PublicContext, ops: list[Op]) -> None:
        self.public, self.ops, self.live = public, ops, _live_inputs(ops)

    @staticmethod
    def depth(ops: list[Op]) -> int:
        return len(ops)

    @staticmethod
    def required_inputs(ops: list[Op]) -> list[int]:
        """Input features some kept weight reads; the client encrypts and sends only these (this
        tells the client which features a pruned model ignores, nothing about the weights)."""
        return np.flatnonzero(_live_inputs(ops)[0]).tolist()

    def infer(self, features: list) -> list:
        """``features``: one ciphertext per required input (``required_inputs``). A value is a
        ciphertext, a plain constant the host already knows (every weight feeding it was pruned),
        or None (nothing downstream reads it)."""
        values: list = [None] * self.ops[0].weight.shape[1]
        required = np.flatnonzero(self.live[0])
        if len(features) != len(required):
            raise KdsecError(f"expected {len(required)} encrypted input features, got {len(features)}")
        for index, ciphertext in zip(required, features):
            values[index] = ciphertext
        for index, op in enumerate(self.ops):
            if isinstance(op, SquareOp):
                values = [self._square(value) for value in values]
                continue
            needed = self.live[index + 1] if index + 1 < len(self.ops) else np.ones(len(op.bias), dtype=bool)
            values = [self._neuron(values, row, float(bias)) if use else None
                      for row, bias, use in zip(op.weight, op.bias, needed)]
        return [self.public.encrypt(value) if isinstance(value, float) else value for value in values]

    def _square(self, value):
        if value is None or isinstance(value, float):
            return value if value is None else value * value
        return self.public.square(value, relinearize=False)

    def _neuron(self, values: list, row: np.ndarray, bias: float):
        total, constant = None, bias
        for value, weight in zip(values, row):
            if weight == 0.0 or value is None:
                continue
            if isinstance(value, float):
                constant += value * weight
                continue
            term = self.public.multiply_plain(value, float(weight))
            total = term if total is None else self.public.add_inplace(total, term)
        if total is None:
            return constant
        return self.public.add_plain(self.public.rescale(self.public.relinearize(total)), constant)


# --- encrypted input, single sample ------------------------------------------------------------


@dataclass(frozen=True)
class GridPlan:
    """The single-sample layout: an R×C grid; Linear ``t`` reduces along rows when ``t`` is even
    (result in column 0) and along columns when odd (result in row 0)."""

    rows: int
    cols: int
    steps: tuple[int, ...]

    @classmethod
    def for_ops(cls, ops: list[Op]) -> GridPlan:
        linears = _linears(ops)
        row_dims = [l.weight.shape[0] if t % 2 == 0 else l.weight.shape[1] for t, l in enumerate(linears)]
        col_dims = [l.weight.shape[1] if t % 2 == 0 else l.weight.shape[0] for t, l in enumerate(linears)]
        rows, cols = _pow2(max(row_dims)), _pow2(max(col_dims))
        return cls(rows, cols, tuple(sorted(set(s for t in range(len(linears)) for s in cls._steps(linears, t, cols)))))

    @staticmethod
    def _steps(linears: list[LinearOp], t: int, cols: int) -> list[int]:
        out_dim, in_dim = linears[t].weight.shape
        spread = [] if t == 0 else (_doubling(out_dim, 1, -1) if t % 2 else _doubling(out_dim, cols, -1))
        reduce = _doubling(in_dim, 1) if t % 2 == 0 else _doubling(in_dim, cols)
        return spread + reduce

    @staticmethod
    def depth(ops: list[Op]) -> int:
        return len(ops) + len(_linears(ops)) - 1  # a mask before every Linear but the first

    @property
    def slots(self) -> int:
        return self.rows * self.cols

    def encode_input(self, sample: np.ndarray) -> np.ndarray:
        grid = np.zeros((self.rows, self.cols))
        flat = sample.reshape(-1)
        grid[:, : len(flat)] = flat
        return grid.reshape(-1)

    def output_slots(self, ops: list[Op]) -> np.ndarray:
        linears = _linears(ops)
        out_dim = linears[-1].weight.shape[0]
        return np.arange(out_dim) * self.cols if (len(linears) - 1) % 2 == 0 else np.arange(out_dim)


class SingleServer:
    """Encrypted-input host, single-sample path (rotations; latency independent of weight count)."""

    def __init__(self, public: PublicContext, ops: list[Op]) -> None:
        self.public, self.ops, self.plan = public, ops, GridPlan.for_ops(ops)

    def infer(self, ciphertexts: list) -> list:
        (value,) = ciphertexts
        rows, cols = self.plan.rows, self.plan.cols
        linear_index = 0
        for op in self.ops:
            if isinstance(op, SquareOp):
                value = self.public.square(value)
                continue
            out_dim, in_dim = op.weight.shape
            grid = np.zeros((rows, cols))
            bias = np.zeros((rows, cols))
            if linear_index % 2 == 0:  # input copied along rows → reduce along each row into column 0
                if linear_index:
                    value = self._spread(value, mask_row=True, count=out_dim, stride=cols)
                grid[:out_dim, :in_dim] = op.weight
                bias[:out_dim, 0] = op.bias
                reduce = _doubling(in_dim, 1)
            else:  # input in column 0 → copy along columns, reduce down each column into row 0
                value = self._spread(value, mask_row=False, count=out_dim, stride=1)
                grid[:in_dim, :out_dim] = op.weight.T
                bias[0, :out_dim] = op.bias
                reduce = _doubling(in_dim, cols)
            value = self.public.rescale(self.public.multiply_plain(value, grid.reshape(-1)))
            value = self.public.rotate_and_sum(value, reduce)
            value = self.public.add_plain(value, bias.reshape(-1))
            linear_index += 1
        return [value]

    def _spread(self, value, mask_row: bool, count: int, stride: int):
        """Keep only the previous result (row 0 or column 0), then copy it ``count`` times."""
        mask = np.zeros((self.plan.rows, self.plan.cols))
        if mask_row:
            mask[0, :] = 1.0
        else:
            mask[:, 0] = 1.0
        value = self.public.rescale(self.public.multiply_plain(value, mask.reshape(-1)))
        return self.public.rotate_and_sum(value, _doubling(count, stride, -1))


# --- encrypted model ---------------------------------------------------------------------------


def _block(ops: list[Op]) -> int:
    linears = _linears(ops)
    dims = [l.weight.shape[0] for l in linears] + [l.weight.shape[1] for l in linears[1:]]
    return _pow2(max(dims))


def encrypted_model_steps(ops: list[Op]) -> tuple[int, ...]:
    linears = _linears(ops)
    steps = set()
    for t, linear in enumerate(linears[1:], start=1):
        steps.update(_doubling(linear.weight.shape[1]))
        if t < len(linears) - 1:
            steps.update(range(-1, -linear.weight.shape[0], -1))
    return tuple(sorted(steps))


def encrypted_model_depth(ops: list[Op]) -> int:
    return len(ops) + max(len(_linears(ops)) - 2, 0)  # a packing step between reduce-Linears


class EncryptedModel:
    """The owner's weights as ciphertexts, each already at the level where the host uses it.

    Layout: samples in blocks of ``block`` slots. Layer 1: one ciphertext per input feature i
    holding W[:, i] in every block, plus one for the bias. Layer t ≥ 2: one ciphertext per
    output neuron k holding W[k, :] in every block, plus one per bias at each block's slot 0.
    The host sees only the structure (layer shapes), never a weight.
    """

    def __init__(self, public: PublicContext, structure: list, tensors: list[list], block: int) -> None:
        self.public, self.structure, self.tensors, self.block = public, structure, tensors, block

    @classmethod
    def encrypt(cls, holder: KeyHolder, ops: list[Op]) -> EncryptedModel:
        public, block = holder.public, _block(ops)
        copies = public.params.slots // block
        tensors: list[list] = []
        level = linear_index = 0
        for op in ops:
            if isinstance(op, SquareOp):
                level += 1
                continue
            out_dim, in_dim = op.weight.shape
            if linear_index == 0:
                rows = [np.tile(np.pad(op.weight[:, i], (0, block - out_dim)), copies) for i in range(in_dim)]
                rows.append(np.tile(np.pad(op.bias, (0, block - out_dim)), copies))
                levels = [level] * in_dim + [level + 1]
            else:
                level += linear_index > 1  # the packing step before a second reduce-Linear
                rows = [np.tile(np.pad(op.weight[k], (0, block - in_dim)), copies) for k in range(out_dim)]
                rows += [np.tile(np.eye(block)[0] * op.bias[k], copies) for k in range(out_dim)]
                levels = [level] * out_dim + [level + 1] * out_dim
            level += 1
            tensors.append([_encrypt_at(holder, values, public.parms_id_at(at)) for values, at in zip(rows, levels)])
            linear_index += 1
        return cls(public, model_structure(ops), tensors, block)

    def serialize(self) -> bytes:
        store = scratch()
        blobs = [store.dump(ct) for layer in self.tensors for ct in layer]
        return pack({"kind": "encrypted-model", "structure": self.structure, "block": self.block,
                     "layout": [len(layer) for layer in self.tensors]}, blobs)

    @classmethod
    def deserialize(cls, public: PublicContext, data: bytes) -> EncryptedModel:
        header, blobs = unpack(data, "encrypted-model")
        ciphertexts = public.load_ciphertexts(pack({"kind": "ciphertexts"}, blobs))
        tensors, offset = [], 0
        for count in header["layout"]:
            tensors.append(ciphertexts[offset:offset + count])
            offset += count
        return cls(public, header["structure"], tensors, header["block"])

    @property
    def samples_per_ciphertext(self) -> int:
        return self.public.params.slots // self.block


def model_structure(ops: list[Op]) -> list:
    """Layer kinds and shapes: what a host may know of a model (never a weight)."""
    return [["linear", *op.weight.shape] if isinstance(op, LinearOp) else ["square"] for op in ops]


def _encrypt_at(holder: KeyHolder, values: np.ndarray, parms_id):
    ciphertext = holder.encrypt(values)
    public = holder.public
    public.evaluator.mod_switch_to_inplace(ciphertext, parms_id)
    return ciphertext


class EncryptedModelHost:
    """Computes with encrypted weights on plaintext inputs; only the owner can read its outputs."""

    def __init__(self, model: EncryptedModel) -> None:
        self.model, self.public = model, model.public

    def infer(self, inputs: np.ndarray) -> list:
        """``inputs``: up to ``samples_per_ciphertext`` plaintext samples. Returns one ciphertext
        per output neuron, sample s's logit at slot ``s · block``."""
        block, public = self.model.block, self.public
        copies = public.params.slots // block
        features = inputs.reshape(len(inputs), -1).astype(np.float64)
        if len(features) > copies:
            raise ValueError(f"{len(features)} samples exceed the {copies} blocks of one ciphertext")
        values: list = []
        linear_index = 0
        for kind, *shape in self.model.structure:
            if kind == "square":
                values = [public.square(value) for value in values]
                continue
            layer = self.model.tensors[linear_index]
            out_dim, in_dim = shape
            if linear_index == 0:
                total = None
                for i in range(in_dim):
                    if not features[:, i].any():  # SEAL refuses a product with an all-zero plaintext
                        continue
                    spread = np.zeros((copies, block))
                    spread[: len(features)] = features[:, i : i + 1]
                    term = public.multiply_plain(layer[i], spread.reshape(-1))
                    total = term if total is None else public.add_inplace(total, term)
                bias = layer[in_dim]
                values = [bias if total is None else public.add_inplace(public.rescale(total),
                                                                        public.match_level(bias, total))]
            else:
                packed = values[0] if len(values) == 1 else self._pack(values)
                outputs = []
                for k in range(out_dim):
                    product = public.rescale(public.multiply(packed, public.match_level(layer[k], packed)))
                    reduced = public.rotate_and_sum(product, _doubling(in_dim))
                    outputs.append(public.add_inplace(reduced, public.match_level(layer[out_dim + k], reduced)))
                values = outputs
            linear_index += 1
        return values

    def _pack(self, values: list):
        """Gather neuron k (at each block's slot 0) into slot k of every block of one ciphertext."""
        mask = np.tile(np.eye(self.model.block)[0], self.public.params.slots // self.model.block)
        packed = None
        for k, value in enumerate(values):
            masked = self.public.rescale(self.public.multiply_plain(value, mask))
            shifted = masked if k == 0 else self.public.rotate(masked, -k)
            packed = shifted if packed is None else self.public.add_inplace(packed, shifted)
        return packed


# --- orchestration: one mode/path over a whole set, timed and compared -------------------------


@dataclass(frozen=True)
class HERun:
    mode: str
    path: str
    samples: int
    agreement: float  # argmax of decrypted logits == argmax of the same arithmetic in plaintext
    agreement_with_model: float  # ... == the deployed (e.g. int8) model's own prediction
    max_abs_logit_error: float
    ms_per_sample: float  # end to end: encode + encrypt + host compute + decrypt, amortized
    server_ms_per_sample: float
    ciphertext_bytes_in: int
    ciphertext_bytes_out: int
    public_context_bytes: int
    package_bytes: int  # what the host is given: public context (+ encrypted weights)
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    host_had_secret_key: bool

    def as_dict(self) -> dict:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes)}


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def run_encrypted_input(ops: list[Op], inputs: np.ndarray, config: HEConfig, path: str = "batched",
                        wire: bool = True, package_dir: Path | None = None,
                        model_predictions: np.ndarray | None = None) -> tuple[np.ndarray, HERun]:
    """Client encrypts ``inputs`` → host (public context only) evaluates → client decrypts.
    With ``wire``, ciphertexts and context cross as bytes, as they would over a network.
    ``model_predictions`` (the deployed model's own labels) give ``agreement_with_model``."""
    if path == "batched":
        params = _params(config, BatchedServer.depth(ops), 1)
        holder = KeyHolder(params)
    else:
        plan = GridPlan.for_ops(ops)
        params = _params(config, GridPlan.depth(ops), plan.slots)
        holder = KeyHolder(params, plan.steps)
    context_bytes = holder.public_context()
    if package_dir is not None and path == "batched":
        write_atomic(package_dir / "encrypted_input.public_context.bin", context_bytes)
    public = PublicContext.deserialize(context_bytes) if wire else holder.public
    server = BatchedServer(public, ops) if path == "batched" else SingleServer(public, ops)
    batch = params.slots if path == "batched" else 1
    required = BatchedServer.required_inputs(ops)
    logits, server_seconds, bytes_in, bytes_out = [], 0.0, 0, 0
    started = time.perf_counter()
    for chunk in _chunks(len(inputs), batch):
        features = inputs[chunk].reshape(chunk.stop - chunk.start, -1).astype(np.float64)
        if path == "batched":
            encrypted = [holder.encrypt(features[:, index]) for index in required]
        else:
            encrypted = [holder.encrypt(plan.encode_input(features[0]))]
        payload = holder.public.dump_ciphertexts(encrypted) if wire else None
        server_started = time.perf_counter()
        outputs = server.infer(public.load_ciphertexts(payload) if wire else encrypted)
        reply = public.dump_ciphertexts(outputs) if wire else None
        server_seconds += time.perf_counter() - server_started
        if wire:
            bytes_in, bytes_out = bytes_in + len(payload), bytes_out + len(reply)
            outputs = holder.public.load_ciphertexts(reply)
        if path == "batched":
            logits.append(np.stack([holder.decrypt(ct)[: len(features)] for ct in outputs], axis=1))
        else:
            logits.append(holder.decrypt(outputs[0])[plan.output_slots(ops)][None, :])
    elapsed = time.perf_counter() - started
    return _summarize("encrypted_input", path, ops, inputs, np.concatenate(logits), elapsed, server_seconds,
                      bytes_in, bytes_out, len(context_bytes), len(context_bytes), params,
                      holder.secret_key_in(context_bytes), model_predictions)


def run_encrypted_model(ops: list[Op], inputs: np.ndarray, config: HEConfig, wire: bool = True,
                        package_dir: Path | None = None,
                        model_predictions: np.ndarray | None = None) -> tuple[np.ndarray, HERun]:
    """Owner encrypts the weights → host evaluates on its plaintext inputs → owner decrypts."""
    steps = encrypted_model_steps(ops)
    params = _params(config, encrypted_model_depth(ops), _block(ops))
    holder = KeyHolder(params, steps)
    model = EncryptedModel.encrypt(holder, ops)
    context_bytes = holder.public_context()
    weights = model.serialize()
    if package_dir is not None:
        write_atomic(package_dir / "encrypted_model.public_context.bin", context_bytes)
        write_atomic(package_dir / "encrypted_model.weights.bin", weights)
    if wire:  # the host rebuilds everything from bytes: it never touches the key holder's objects
        public = PublicContext.deserialize(context_bytes)
        host_model = EncryptedModel.deserialize(public, weights)
    else:
        public, host_model = holder.public, model
    host = EncryptedModelHost(host_model)
    logits, server_seconds, bytes_out = [], 0.0, 0
    started = time.perf_counter()
    for chunk in _chunks(len(inputs), model.samples_per_ciphertext):
        server_started = time.perf_counter()
        outputs = host.infer(inputs[chunk])
        reply = public.dump_ciphertexts(outputs) if wire else None
        server_seconds += time.perf_counter() - server_started
        if wire:
            bytes_out += len(reply)
            outputs = holder.public.load_ciphertexts(reply)
        count = chunk.stop - chunk.start
        logits.append(np.stack([holder.decrypt(ct)[: count * model.block: model.block] for ct in outputs], axis=1))
    elapsed = time.perf_counter() - started
    return _summarize("encrypted_model", "batched", ops, inputs, np.concatenate(logits), elapsed, server_seconds,
                      0, bytes_out, len(context_bytes), len(context_bytes) + len(weights), params,
                      holder.secret_key_in(context_bytes, weights), model_predictions)


def _summarize(mode, path, ops, inputs, logits, elapsed, server_seconds, bytes_in, bytes_out, context_bytes,
               package_bytes, params: HEParams, host_had_secret_key: bool,
               model_predictions: np.ndarray | None) -> tuple[np.ndarray, HERun]:
    plain = plaintext_forward(ops, inputs)
    run = HERun(
        mode=mode, path=path, samples=len(inputs),
        agreement=float((logits.argmax(1) == plain.argmax(1)).mean()),
        agreement_with_model=(float("nan") if model_predictions is None
                              else float((logits.argmax(1) == model_predictions[: len(inputs)]).mean())),
        max_abs_logit_error=float(np.abs(logits - plain).max()),
        ms_per_sample=1e3 * elapsed / len(inputs), server_ms_per_sample=1e3 * server_seconds / len(inputs),
        ciphertext_bytes_in=bytes_in, ciphertext_bytes_out=bytes_out, public_context_bytes=context_bytes,
        package_bytes=package_bytes, poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=params.coeff_mod_bit_sizes, scale_bits=params.scale_bits,
        host_had_secret_key=host_had_secret_key)
    return logits, run


@dataclass(frozen=True)
class HEResult:
    """Every mode/path run on the candidate, and the headline numbers the gate and report use;
    no runs when the stage is off (``encrypt.he.enabled: false``)."""

    runs: list[HERun]

    @property
    def enabled(self) -> bool:
        return bool(self.runs)

    @property
    def agreement(self) -> float | None:
        return min(run.agreement for run in self.runs) if self.runs else None

    def run(self, mode: str, path: str) -> HERun | None:
        return next((r for r in self.runs if r.mode == mode and r.path == path), None)

    def as_dict(self) -> dict:
        if not self.runs:
            return {"enabled": False, "agreement": None, "samples": 0, "ms_per_sample": None,
                    "single_sample_ms": None, "host_had_secret_key": False, "runs": []}
        batched = self.run("encrypted_input", "batched") or self.runs[0]
        single = self.run("encrypted_input", "single")
        return {"enabled": True, "agreement": self.agreement, "samples": batched.samples,
                "ms_per_sample": batched.ms_per_sample,
                "single_sample_ms": single.ms_per_sample if single else None,
                "host_had_secret_key": any(r.host_had_secret_key for r in self.runs),
                "runs": [r.as_dict() for r in self.runs]}


def encrypted_inference(model: nn.Module, inputs: np.ndarray, config: HEConfig,
                        package_dir: Path | None = None) -> HEResult:
    """Run each configured mode on ``inputs`` (the single-sample path on the first
    ``config.latency_samples``), compare with plaintext and with the deployed model itself, and
    write the host packages (public contexts, encrypted weights, ``he_package.json``) to ``package_dir``."""
    preprocess, ops = he_program(model)
    with torch.inference_mode():
        predictions = model.cpu().eval()(torch.as_tensor(inputs)).argmax(1).numpy()
    inputs = preprocess(inputs)  # public preprocessing on the client, before encryption
    runs = []
    for mode in config.modes:
        if mode == "encrypted_input":
            runs.append(run_encrypted_input(ops, inputs, config, "batched", package_dir=package_dir,
                                            model_predictions=predictions)[1])
            if config.latency_samples:
                runs.append(run_encrypted_input(ops, inputs[: config.latency_samples], config, "single",
                                                model_predictions=predictions)[1])
        else:
            runs.append(run_encrypted_model(ops, inputs, config, package_dir=package_dir,
                                            model_predictions=predictions)[1])
    result = HEResult(runs)
    if package_dir is not None:
        files = {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
                 for path in sorted(package_dir.glob("*.bin"))}
        write_atomic(package_dir / "he_package.json", json.dumps({
            "structure": model_structure(ops), "grid": asdict(GridPlan.for_ops(ops)),
            "encrypted_model_rotation_steps": list(encrypted_model_steps(ops)),
            "runs": [{k: v for k, v in run.as_dict().items() if k in (
                "mode", "path", "poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits")} for run in runs],
            "files": files,
            "note": "public contexts and ciphertexts only: the secret key stayed with the key holder",
        }, indent=2))
    return result
