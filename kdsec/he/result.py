"""What a run measured: ``HERun`` (one mode/path over a set of samples, compared with the
plaintext arithmetic and with the deployed model's own predictions), ``_summarize`` (how the
runners build it) and ``HEResult`` (every run on the candidate: what the gate and report read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kdsec.he.program import plaintext_forward
from kdsec.he.params import HEParams


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
    last_scale_bits: int | None = None  # set: the last Linear ran unrescaled, its weights at 2^this
    weight_scale_bits: int | None = None  # set: the paired chain (weights at 2^this, one rescale per x²)
    accuracy: float | None = None  # decrypted predictions against the labels (None: no labels given)

    def as_dict(self) -> dict:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes)}


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
        host_had_secret_key=host_had_secret_key, last_scale_bits=params.last_scale_bits,
        weight_scale_bits=params.weight_scale_bits)
    return logits, run


@dataclass(frozen=True)
class HEResult:
    """Every mode/path run on the candidate, and the headline numbers the gate and report use;
    no runs when the stage is off (``encrypt.he.enabled: false``)."""

    runs: list[HERun]

    @property
    def enabled(self) -> bool:
        return bool(self.runs)

    def worst(self, measure: str) -> HERun | None:
        """The run with the lowest ``measure`` (e.g. ``agreement``); a NaN counts as the lowest."""
        def key(run: HERun) -> tuple[bool, float]:
            value = getattr(run, measure)
            return value == value, value

        return min(self.runs, key=key, default=None)

    @property
    def agreement(self) -> float | None:
        """With the lowered program's plaintext arithmetic: the minimum over every mode and path."""
        return run.agreement if (run := self.worst("agreement")) else None

    @property
    def agreement_with_model(self) -> float | None:
        """With the shipped model's own predictions: the minimum over every mode and path (NaN when
        a run had no model predictions to compare with)."""
        return run.agreement_with_model if (run := self.worst("agreement_with_model")) else None

    @property
    def host_had_secret_key(self) -> bool:
        return any(run.host_had_secret_key for run in self.runs)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy as evaluated under encryption: the batched encrypted-input run's (the
        whole split the config asks for; the single-sample run sees a handful of samples)."""
        run = self.run("encrypted_input", "batched")
        return None if run is None else run.accuracy

    def run(self, mode: str, path: str) -> HERun | None:
        return next((r for r in self.runs if r.mode == mode and r.path == path), None)

    def as_dict(self) -> dict:
        if not self.runs:
            return {"enabled": False, "agreement": None, "accuracy": None, "samples": 0, "ms_per_sample": None,
                    "single_sample_ms": None, "host_had_secret_key": False, "runs": []}
        batched = self.run("encrypted_input", "batched") or self.runs[0]
        single = self.run("encrypted_input", "single")
        return {"enabled": True, "agreement": self.agreement, "accuracy": self.accuracy, "samples": batched.samples,
                "ms_per_sample": batched.ms_per_sample,
                "single_sample_ms": single.ms_per_sample if single else None,
                "host_had_secret_key": self.host_had_secret_key,
                "runs": [r.as_dict() for r in self.runs]}

    def metrics(self) -> dict[str, float]:
        """Every run's numeric measurements, named ``<mode>.<path>.<measurement>``."""
        return {f"{run.mode}.{run.path}.{key}": float(value) for run in self.runs
                for key, value in run.as_dict().items() if isinstance(value, (int, float))}
