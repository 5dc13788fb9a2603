"""Differentially private training with Opacus DP-SGD.

Per-sample gradients are clipped to ``max_grad_norm`` and Gaussian noise is added to their sum;
Opacus picks the noise multiplier that reaches ``target_epsilon`` at ``delta`` after ``epochs``
of Poisson-sampled batches, and its accountant reports the ε actually spent. Only hard labels of
the training split are used: teacher soft labels depend on the whole private training set, so a
distilled student would not inherit the guarantee. Selecting the best epoch on the validation
split is post-processing of iterates the accountant already covers.

The accountant's ε holds only if the adversary cannot know the noise, nor which rows each
Poisson-sampled batch drew (amplification by subsampling): both come from generators seeded
afresh from ``os.urandom`` on every run, a seed that is never logged or stored, so two runs of
the same config draw different noise and batches. Opacus's ``secure_mode`` would use a CSPRNG
for every draw, but it needs ``torchcsprng``, which has no build for this torch.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdsec.config import DPConfig
from kdsec.errors import TrainingError
from kdsec.progress import progress
from kdsec.train import evaluate

ACCOUNTANT = "prv"  # Gopi et al. 2021: tight numerical composition (Opacus's default)
NOISE_SOURCE = ("noise and batch sampling from torch generators seeded per run with 64 bits of os.urandom "
                "(seed never logged or stored; not Opacus secure_mode)")


@dataclass(frozen=True)
class DPFit:
    epsilon: float  # spent, as reported by the accountant after the last step
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    best_epoch: int
    epochs_run: int
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, float | str]:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "sample_rate": self.sample_rate, "steps": self.steps,
                "noise_source": NOISE_SOURCE}


def secret_generator() -> torch.Generator:
    """A generator nobody can replay: seeded from the OS's CSPRNG, the seed kept nowhere."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def fit_private(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                config: DPConfig, label: str = "dp-train") -> DPFit:
    """Train ``model`` (CPU) with DP-SGD (Adam update) to ``config.target_epsilon``; leave the
    epoch with the best validation loss in ``model``. The initial weights are the caller's (seeded);
    the noise and the batches are secret (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and its own deprecations
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise TrainingError(f"{label}: the model cannot be trained with DP-SGD ({errors[0]})")
    model.cpu().train()
    loader = DataLoader(TensorDataset(torch.as_tensor(x_train), torch.as_tensor(y_train)),
                        batch_size=min(config.batch_size, len(y_train)), generator=secret_generator())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": the generators below are seeded from os.urandom
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=config.target_epsilon,
            target_delta=config.delta, epochs=config.epochs, max_grad_norm=config.max_grad_norm,
            noise_generator=secret_generator())
    best_state = copy.deepcopy(model.state_dict())
    best_loss, best_accuracy, best_epoch, steps = math.inf, 0.0, 0, 0
    history: list[dict[str, float]] = []
    with progress(label, config.epochs) as advance, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(1, config.epochs + 1):
            private.train()
            total, batches = 0.0, 0
            for inputs, targets in loader:
                if len(targets) == 0:  # Poisson sampling can draw an empty batch
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(private(inputs), targets)
                if not math.isfinite(loss.item()):
                    raise TrainingError(f"{label}: loss became {float(loss)} at epoch {epoch}; lower "
                                        f"student.dp.lr (currently {config.lr})")
                loss.backward()
                optimizer.step()
                total, batches, steps = total + float(loss), batches + 1, steps + 1
            val_loss, val_accuracy = evaluate(model, x_val, y_val)
            history.append({"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_accuracy,
                            "ce": total / max(batches, 1)})
            advance(f"val_acc={val_accuracy:.4f}")
            if val_loss < best_loss:
                best_loss, best_accuracy, best_epoch = val_loss, val_accuracy, epoch
                best_state = copy.deepcopy(model.state_dict())
        epsilon = float(engine.get_epsilon(config.delta))
    private.to_standard_module()  # removes Opacus's hooks and per-sample gradient buffers
    model.load_state_dict(best_state)
    model.eval()
    return DPFit(epsilon=epsilon, delta=config.delta, noise_multiplier=float(optimizer.noise_multiplier),
                 max_grad_norm=config.max_grad_norm, sample_rate=float(loader.sample_rate), steps=steps,
                 best_epoch=best_epoch, epochs_run=len(history), best_val_accuracy=best_accuracy, history=history)
