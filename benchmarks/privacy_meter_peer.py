"""ML Privacy Meter (PyPI ``privacy-meter`` 1.0.1) as a peer of our membership attacks.

Its two attacks that need no more than we give ours, run through its own classes:
- the *population* attack (``PopulationMetric``): one loss threshold, the α-quantile of the
  target model's losses on population data;
- the *reference* attack (``ReferenceMetric``, attack R of Ye et al. 2022): a threshold per sample,
  the α-quantile of the reference models' losses on that very sample (ours: the cached reference
  models, trained on halves of the population, so none has seen an audited sample).

Privacy Meter answers with member / non-member decisions at each α (its default grid, 100 values
from 1e-5 to 1), not with scores: the ROC is those operating points, the AUC its trapezoids (as
Privacy Meter computes it), TPR at an FPR the best point at or under it, and the 95 % intervals
come from resampling members and non-members (columns of its decision matrix).

``privacy_meter.model`` imports TensorFlow at the top for its ``TensorflowModel`` class, which this
peer does not use; where TensorFlow is not installed (the locked environment: ~600 MB for one
unused import) an empty module stands in for it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import numpy as np
import torch
from torch import nn

from kdsec.audit.membership import MembershipResult


def _import_privacy_meter():
    if "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        sys.modules["tensorflow"] = types.ModuleType("tensorflow")  # see the module docstring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from privacy_meter import hypothesis_test, metric
        from privacy_meter.dataset import Dataset
        from privacy_meter.information_source import InformationSource
        from privacy_meter.information_source_signal import ModelLoss
        from privacy_meter.model import PytorchModelTensor
        from privacy_meter.utils import default_quantile
    return metric, hypothesis_test, Dataset, InformationSource, ModelLoss, PytorchModelTensor, default_quantile


def _summary(name: str, decisions: np.ndarray, members: int, low_fpr: float, bootstrap: int,
             seed: int) -> MembershipResult:
    """A MembershipResult from a (thresholds × samples) decision matrix, members first."""
    def curve(member_columns, non_member_columns):
        tpr = decisions[:, member_columns].mean(axis=1)
        fpr = decisions[:, non_member_columns].mean(axis=1)
        order = np.lexsort((tpr, fpr))
        fpr, tpr = np.r_[0.0, fpr[order], 1.0], np.r_[0.0, tpr[order], 1.0]
        return fpr, tpr

    def figures(fpr, tpr):
        return (float(np.trapezoid(tpr, fpr)), float(tpr[fpr <= low_fpr].max()), float(tpr[fpr <= 0.001].max()))

    total = decisions.shape[1]
    member_index, non_member_index = np.arange(members), np.arange(members, total)
    fpr, tpr = curve(member_index, non_member_index)
    auc, tpr_low, tpr_0_1 = figures(fpr, tpr)
    rng = np.random.default_rng(seed)
    aucs, tprs = [], []
    for _ in range(bootstrap):
        boot = figures(*curve(rng.choice(member_index, members), rng.choice(non_member_index, total - members)))
        aucs.append(boot[0])
        tprs.append(boot[1])
    interval = (lambda values: (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
                if values else (float("nan"), float("nan")))
    return MembershipResult(attack=name, auc=auc, tpr_at_low_fpr=tpr_low, low_fpr=low_fpr, members=members,
                            non_members=total - members, roc_fpr=fpr.tolist(), roc_tpr=tpr.tolist(),
                            tpr_at_0_1_fpr=tpr_0_1, auc_ci=interval(aucs), tpr_at_low_fpr_ci=interval(tprs))


def privacy_meter_attacks(model: nn.Module, references: list[nn.Module], samples, low_fpr: float,
                          bootstrap: int, seed: int) -> dict[str, MembershipResult]:
    """Privacy Meter's population and reference attacks on ``samples``' members vs non-members."""
    metric, hypothesis_test, Dataset, InformationSource, ModelLoss, PytorchModelTensor, default_quantile = \
        _import_privacy_meter()

    def tensors(x, y):
        return {"x": torch.as_tensor(x, dtype=torch.float32), "y": torch.as_tensor(y, dtype=torch.long)}

    target_data = Dataset({"train": tensors(samples.x_members, samples.y_members),
                           "test": tensors(samples.x_non_members, samples.y_non_members)}, "x", "y")
    population = Dataset({"train": tensors(samples.x_population, samples.y_population)}, "x", "y")

    def wrap(module):
        return PytorchModelTensor(module.cpu().eval(), nn.CrossEntropyLoss(), batch_size=1024)

    target = InformationSource(models=[wrap(model)], datasets=[target_data])
    results = {}
    population_attack = metric.PopulationMetric(
        target_info_source=target, reference_info_source=InformationSource(models=[wrap(model)], datasets=[population]),
        signals=[ModelLoss()], hypothesis_test_func=hypothesis_test.linear_itp_threshold_func)
    reference_attack = metric.ReferenceMetric(
        target_info_source=target,
        reference_info_source=InformationSource(models=[wrap(m) for m in references], datasets=[target_data]),
        signals=[ModelLoss()], hypothesis_test_func=hypothesis_test.linear_itp_threshold_func)
    members = len(samples.y_members)
    for name, attack in (("Privacy Meter population", population_attack),
                         (f"Privacy Meter reference, {len(references)} ref.", reference_attack)):
        attack.prepare_metric()
        decisions = np.asarray(attack.run_metric(fpr_tolerance_rate_list=default_quantile())[0].predicted_labels)
        results[name] = _summary(name, decisions.astype(bool), members, low_fpr, bootstrap, seed)
    return results
