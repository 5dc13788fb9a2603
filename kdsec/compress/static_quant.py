"""Static post-training int8 quantization of conv nets with a calibration set, through the PT2E
flow of torchao (``torch.export`` → ``prepare_pt2e`` with the X86 inductor quantizer → calibrate
→ ``convert_pt2e``).

Why this route: torch.ao.quantization's eager API is deprecated and the PT2E entry points have
moved out of torch into torchao; PT2E quantizes conv *and* linear layers with per-channel int8
weights and calibrated per-tensor uint8 activations. The converted graph is a *reference*
program (quantize → dequantize → float op): the numbers of int8 inference, at more than fp32's
cost. ``lower_static_int8`` then runs inductor's freezing passes on it (what ``torch.compile``
does first, with no C++ compiler needed): each q/dq pattern becomes one oneDNN int8 kernel
(``onednn.qconv_pointwise`` / ``qlinear_pointwise``) on prepacked weights — int8 speed, for any
batch size. Loading lowers by default; what is stored is always the reference program's numbers.

Storage is safetensors, never pickle: the int8 weights, their per-channel scales, the biases and
the calibrated (scale, zero point) of every activation. Loading re-exports the architecture,
converts it, and puts the stored numbers back into the program — the same program, bit for bit.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from kdsec.errors import IntegrityError
from kdsec.fileio import PRIVATE, write_atomic
from kdsec.models.catalog import build_model
from kdsec.models.checkpoint import read_kdsec_file
from kdsec.models.spec import ModelSpec

FORMAT_KEY = "kdsec.int8_static"
_BATCH = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)  # any batch size
logger = logging.getLogger("kdsec")




def _annotatable(model: nn.Module) -> nn.Module:
    """``model`` (eval mode) as the X86 quantizer can annotate it. For nets with BatchNorm
    (ResNets): BN folded into the conv before it (torch.fx's ``fuse``), and every ReLU *module*
    call turned into a functional call — the quantizer groups all calls of one shared module
    (torchvision's BasicBlock reuses ``self.relu``) into one pattern and fails on it. Other nets
    are left as they are, so files saved from them keep loading."""
    if not any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    fused = fuse(model)
    for node in list(fused.graph.nodes):
        if node.op == "call_module" and isinstance(fused.get_submodule(node.target), nn.ReLU):
            with fused.graph.inserting_before(node):
                relu = fused.graph.call_function(torch.nn.functional.relu, node.args)
            node.replace_all_uses_with(relu)
            fused.graph.erase_node(node)
    fused.recompile()
    return fused


def _prepare(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)

        example = torch.zeros(2, *input_shape)
        exported = torch.export.export(_annotatable(model.cpu().eval()), (example,), dynamic_shapes=_BATCH).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        return prepare_pt2e(exported, quantizer)


def _as_model(program: nn.Module) -> nn.Module:
    """.eval()/.train() on an exported program are no-ops (it has no dropout or batch norm left)
    that return it, like nn.Module's, so the rest of kdsec can treat it like any model."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(program)
    switch = program.train

    def train(mode: bool = True) -> nn.Module:
        switch(mode)
        return program  # so model.cpu().eval() chains

    program.train = train
    program.eval = lambda: train(False)
    return program


def _convert(prepared: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return _as_model(convert_pt2e(prepared))


def lower_static_int8(program: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The reference int8 ``program`` with its quantize/dequantize patterns fused into oneDNN int8
    kernels on prepacked weights (torchao's ``lower_pt2e_quantized_to_x86``, but keeping the batch
    dimension dynamic). Outputs match the reference program's to int8 rounding (tested); where
    the passes are unavailable (a CPU without oneDNN int8), the reference program is returned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch._inductor.constant_folding import constant_fold
        from torch._inductor.fx_passes.freezing_patterns import freezing_passes

        example = (torch.zeros(2, *input_shape),)
        try:
            decompositions = {op: fn for op, fn in torch.export.default_decompositions().items()
                              if torch._export.utils._is_cia_op(op)}
            lowered = torch.export.export(program, example, dynamic_shapes=_BATCH, strict=True
                                          ).run_decompositions(decompositions).module()
            graph = lowered.graph
            for node in list(graph.nodes):  # the int8 linear patterns match permute, not t
                if node.target == torch.ops.aten.t.default:
                    with graph.inserting_before(node):
                        permute = graph.call_function(torch.ops.aten.permute.default, (node.args[0], [1, 0]))
                    node.replace_all_uses_with(permute)
                    graph.erase_node(node)
            lowered.recompile()
            with torch.no_grad():
                freezing_passes(lowered, example)
            constant_fold(lowered)
            for node in lowered.graph.nodes:
                # oneDNN's int8 conv writes channels-last: flattening it needs a reshape, not a view.
                if node.target == torch.ops.aten.view.default:
                    node.target = torch.ops.aten.reshape.default
            lowered.recompile()
        except Exception as error:  # noqa: BLE001 - fall back to the (correct, slower) reference program
            logger.warning("int8 lowering unavailable here (%s); running the reference int8 program",
                           str(error).splitlines()[0][:200])
            return program
    return _as_model(lowered)


def _activation_nodes(program: nn.Module) -> list:
    """The per-tensor (activation) quantize/dequantize nodes, in graph order."""
    targets = (torch.ops.quantized_decomposed.quantize_per_tensor.default,
               torch.ops.quantized_decomposed.dequantize_per_tensor.default)
    return [node for node in program.graph.nodes if node.op == "call_function" and node.target in targets]


def _activation_qparams(program: nn.Module) -> torch.Tensor:
    """(scale, zero point) of every activation quantization point, as an n×2 float64 tensor."""
    return torch.tensor([[float(node.args[1]), float(node.args[2])] for node in _activation_nodes(program)],
                        dtype=torch.float64).reshape(-1, 2)


def _graph_tensors(converted: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the quantized program reads (int8 weights, scales, zero points, biases) — not the
    float weights the exported module still carries."""
    used = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    return {name: tensor for name, tensor in converted.state_dict().items() if name in used}


def quantize_static_int8(model: nn.Module, calibration: np.ndarray, batch_size: int = 256) -> nn.Module:
    """The int8 program for ``model`` on CPU, activations calibrated on ``calibration``; ``calibration`` is a few
    hundred real inputs (never the test split)."""
    prepared = _prepare(model, tuple(calibration.shape[1:]))
    with torch.no_grad():
        for start in range(0, len(calibration), batch_size):
            prepared(torch.as_tensor(calibration[start:start + batch_size]))
    return _convert(prepared)


def save_static_int8(quantized: nn.Module, spec: ModelSpec, path: Path) -> Path:
    tensors = {f"graph.{name}": tensor.contiguous() for name, tensor in _graph_tensors(quantized).items()}
    tensors["activation_qparams"] = _activation_qparams(quantized)
    return write_atomic(path, save(tensors, metadata={"kdsec.spec": spec.to_json(),
                                                      FORMAT_KEY: json.dumps({"route": "pt2e-x86"})}), mode=PRIVATE)


def load_static_int8(path: Path, lower: bool = True) -> tuple[nn.Module, ModelSpec]:
    """The stored int8 program, lowered to oneDNN int8 kernels (``lower=False``: the reference
    program, bit-equal to the one that was saved)."""
    spec, _, tensors = read_kdsec_file(path, "a kdsec static int8 checkpoint")
    # The same program from a placeholder calibration, then the stored numbers put in: int8
    # weights and their scales (graph tensors) and every activation's (scale, zero point).
    prepared = _prepare(build_model(spec), spec.input_shape)
    with torch.no_grad():
        prepared(torch.zeros(1, *spec.input_shape))
    converted = _convert(prepared)
    graph = {key.removeprefix("graph."): value for key, value in tensors.items() if key.startswith("graph.")}
    expected = set(_graph_tensors(converted))
    nodes = _activation_nodes(converted)
    qparams = tensors.get("activation_qparams")
    if expected != set(graph) or qparams is None or len(qparams) != len(nodes):
        raise IntegrityError(f"'{path}' does not match the {spec.arch} int8 program "
                             f"(missing {sorted(expected - set(graph))[:3]})")
    converted.load_state_dict(graph, strict=False)
    for node, (scale, zero_point) in zip(nodes, qparams.tolist()):
        node.args = (node.args[0], scale, int(zero_point), *node.args[3:])
    converted.recompile()
    return (lower_static_int8(converted, spec.input_shape) if lower else converted), spec
