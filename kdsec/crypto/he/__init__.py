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
"""

from kdsec.crypto.he.batched import BatchedServer
from kdsec.crypto.he.encrypted_input import (DiagonalPlan, DiagonalServer, GridPlan, SingleServer,
                                             run_encrypted_input, single_plan)
from kdsec.crypto.he.encrypted_model import (EncryptedModel, EncryptedModelHost, encrypted_model_depth,
                                             encrypted_model_steps, run_encrypted_model)
from kdsec.crypto.he.gather import GatherPlan, GatherServer
from kdsec.crypto.he.program import (HE_FRIENDLY_ARCHS, LinearOp, Op, SquareOp, he_ops, he_program,
                                     model_structure, plaintext_forward)
from kdsec.crypto.he.result import HEResult, HERun
from kdsec.crypto.he.runner import check_layouts, encrypted_inference

__all__ = ["HE_FRIENDLY_ARCHS", "BatchedServer", "DiagonalPlan", "DiagonalServer", "EncryptedModel",
           "EncryptedModelHost", "GatherPlan", "GatherServer", "GridPlan", "HEResult", "HERun", "LinearOp", "Op", "SquareOp", "SingleServer",
           "check_layouts", "encrypted_inference", "encrypted_model_depth", "encrypted_model_steps", "he_ops",
           "he_program", "model_structure", "plaintext_forward", "run_encrypted_input", "run_encrypted_model",
           "single_plan"]
