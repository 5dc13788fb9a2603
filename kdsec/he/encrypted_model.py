"""Encrypted-model mode: the owner encrypts the weights; the host computes on its plaintext
inputs and can read neither the weights nor the logits.

Samples sit in blocks of B slots. The first layer is plaintext-input × encrypted-weight-column
sums; later layers are ciphertext products with encrypted weight rows followed by a
rotate-and-sum inside each block. Zero weights are *not* skipped in this mode: skipping them
would show the host the sparsity pattern.

``EncryptedModel`` is the owner's encrypted weights (and their wire form), ``EncryptedModelHost``
the host's computation, ``run_encrypted_model`` the round trip: owner encrypts the weights →
host evaluates → owner decrypts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from kdsec.config import HEConfig
from kdsec.he.program import (Op, SquareOp, doubling_steps, he_params, linear_ops, model_structure, next_pow2,
                                     sample_chunks)
from kdsec.he.result import HERun, _summarize
from kdsec.he.seal import KeyHolder, PublicContext, scratch
from kdsec.he.bundle import pack, unpack
from kdsec.fileio import write_atomic
from kdsec.progress import progress

logger = logging.getLogger("kdsec")


def block_size(ops: list[Op]) -> int:
    linears = linear_ops(ops)
    dims = [l.weight.shape[0] for l in linears] + [l.weight.shape[1] for l in linears[1:]]
    return next_pow2(max(dims))


def encrypted_model_steps(ops: list[Op]) -> tuple[int, ...]:
    linears = linear_ops(ops)
    steps = set()
    for t, linear in enumerate(linears[1:], start=1):
        steps.update(doubling_steps(linear.weight.shape[1]))
        if t < len(linears) - 1:
            steps.update(range(-1, -linear.weight.shape[0], -1))
    return tuple(sorted(steps))


def encrypted_model_ciphertexts(ops: list[Op]) -> int:
    """How many weight ciphertexts ``EncryptedModel.encrypt`` makes: one per input feature of the
    first layer and its bias; a weight row and a bias per output neuron of every later layer."""
    linears = linear_ops(ops)
    return linears[0].weight.shape[1] + 1 + sum(2 * linear.weight.shape[0] for linear in linears[1:])


def encrypted_model_depth(ops: list[Op]) -> int:
    return len(ops) + max(len(linear_ops(ops)) - 2, 0)  # a packing step between reduce-Linears


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
        public, block = holder.public, block_size(ops)
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
                    reduced = public.rotate_and_sum(product, doubling_steps(in_dim))
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


# --- the round trip: owner encrypts the weights, host evaluates, owner decrypts ----------------


def run_encrypted_model(ops: list[Op], inputs: np.ndarray, config: HEConfig, wire: bool = True,
                        package_dir: Path | None = None,
                        model_predictions: np.ndarray | None = None) -> tuple[np.ndarray, HERun]:
    """Owner encrypts the weights → host evaluates on its plaintext inputs → owner decrypts."""
    steps = encrypted_model_steps(ops)
    params = he_params(config, encrypted_model_depth(ops), block_size(ops))
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
    chunks = list(sample_chunks(len(inputs), model.samples_per_ciphertext))
    with progress("HE encrypted model", len(chunks)) as advance:
        for chunk in chunks:
            server_started = time.perf_counter()
            outputs = host.infer(inputs[chunk])
            reply = public.dump_ciphertexts(outputs) if wire else None
            server_seconds += time.perf_counter() - server_started
            if wire:
                bytes_out += len(reply)
                outputs = holder.public.load_ciphertexts(reply)
            count = chunk.stop - chunk.start
            logits.append(np.stack([holder.decrypt(ct)[: count * model.block: model.block] for ct in outputs],
                                   axis=1))
            advance(f"{chunk.stop}/{len(inputs)} samples")
            if time.perf_counter() - started > config.max_mode_seconds and chunk.stop < len(inputs):
                logger.warning("HE encrypted model: %d of %d samples within encrypt.he.max_mode_seconds (%.0f s, "
                               "%.0f ms/sample); the run reports those (raise the setting for all of them)",
                               chunk.stop, len(inputs), config.max_mode_seconds,
                               1e3 * (time.perf_counter() - started) / chunk.stop)
                inputs = inputs[: chunk.stop]
                break
    elapsed = time.perf_counter() - started
    return _summarize("encrypted_model", "batched", ops, inputs, np.concatenate(logits), elapsed, server_seconds,
                      0, bytes_out, len(context_bytes), len(context_bytes) + len(weights), params,
                      holder.secret_key_in(context_bytes, weights), model_predictions)
