"""CKKS inference of HE-friendly students (affine layers and x²) in two protection modes.

- ``program``: a torch model lowered to HE operations (each run of affine layers — Linear, conv,
  pooling, BatchNorm — one Linear map, x²; input pooling folded or moved to the client), the
  float64 reference of the same arithmetic, layout and parameter helpers.
- ``encrypted_input``: the host holds the plaintext model and a public context, the client's
  data stays encrypted; *batched* (``BatchedServer``, pruned weights skipped; its Linear layers
  as residue-domain matrix products, ``residue``, on the paired chain) and *single*
  (``GridPlan``/``SingleServer``; where no grid fits a ring, ``gather``'s ``GatherPlan``/
  ``GatherServer`` for programs alternating Linear and x², else ``DiagonalPlan``/``DiagonalServer``:
  rotations; ``single_plan`` picks) paths, and their round trip.
- ``encrypted_model``: the owner encrypts the weights (``EncryptedModel``); the host
  (``EncryptedModelHost``) computes on its plaintext inputs and reads neither weights nor logits.
- ``result``: one run's measurements (``HERun``) and all of a candidate's (``HEResult``).
- ``runner``: ``encrypted_inference``, the pipeline's entry, and the host package it writes;
  ``check_layouts``, whether every configured layout fits (before any encryption).

Encryption parameters come from the layout's multiplicative depth (``plan_params``).

Below them: ``params`` (secure moduli, chain layouts), ``bundle`` (the strict wire format of
contexts and ciphertexts) and ``seal`` (``KeyHolder``, the only owner of a secret key, and
``PublicContext``, what travels). Over HTTP: ``host`` (``HEHost``: sessions and their bounds),
``server`` (``make_server``, ``python -m kdsec.he.server``) and ``client`` (``HEHttpClient``).
``stage`` is the pipeline's homomorphic stage. At-rest crypto stays in ``kdsec.crypto``.

The names below load on first use (PEP 562): a batched host process imports ``batched`` alone,
without torch (``ops`` holds the operations torch-free), and starts in ~0.4 s instead of ~4 s.
"""

import importlib

_EXPORTS = {
    "BatchedServer": "batched",
    **dict.fromkeys(("DiagonalPlan", "DiagonalServer", "GridPlan", "SingleServer", "run_encrypted_input",
                     "single_plan"), "encrypted_input"),
    **dict.fromkeys(("EncryptedModel", "EncryptedModelHost", "encrypted_model_depth", "encrypted_model_steps",
                     "run_encrypted_model"), "encrypted_model"),
    **dict.fromkeys(("GatherPlan", "GatherServer"), "gather"),
    **dict.fromkeys(("LinearOp", "Op", "SquareOp", "model_structure", "plaintext_forward"), "ops"),
    **dict.fromkeys(("HE_FRIENDLY_ARCHS", "he_ops", "he_program"), "program"),
    **dict.fromkeys(("HEResult", "HERun"), "result"),
    **dict.fromkeys(("check_layouts", "encrypted_inference"), "runner"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
