"""The picture a reviewer reads: for a few test images, the input and the teacher's, scratch
student's, KD student's and candidate's attribution maps, each titled with that model's answer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from kdsec import roles
from kdsec.data import DataBundle
from kdsec.fileio import write_atomic

FIGURE_ROLES = (roles.TEACHER, roles.SCRATCH_STUDENT, roles.KD_STUDENT, roles.CANDIDATE)
FIGURE_IMAGES = 8
_TITLES = {roles.TEACHER: "teacher", roles.SCRATCH_STUDENT: "scratch", roles.KD_STUDENT: "KD",
           roles.CANDIDATE: "candidate"}


def figure_rows(indices: list[int], misclassified: list[int]) -> list[int]:
    """Up to ``FIGURE_IMAGES`` of the sample, half of them misclassified by a student where there
    are that many, spread over the sample (deterministic)."""
    wrong = set(misclassified)
    right = [index for index in indices if index not in wrong]
    shown_wrong = _spread(misclassified, min(len(misclassified), FIGURE_IMAGES // 2))
    return sorted(shown_wrong + _spread(right, min(len(right), FIGURE_IMAGES - len(shown_wrong))))


def _spread(items: list[int], count: int) -> list[int]:
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)] if count else []


def _picture(image: np.ndarray, bundle: DataBundle) -> np.ndarray:
    """A model input as the pixels a person sees: normalization undone, [0, 1], channels last."""
    if bundle.normalization is not None:
        mean, std = (np.asarray(values, dtype=np.float32)[:, None, None] for values in bundle.normalization)
        image = image * std + mean
    image = np.clip(image, 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def attribution_grid(inputs: np.ndarray, labels: np.ndarray, bundle: DataBundle, maps: dict[str, np.ndarray],
                     predictions: dict[str, np.ndarray], attributed_with: dict[str, str], method: str,
                     path: Path) -> Path:
    """A PNG grid: one row per image (its true class on the left), one column per model in ``maps``
    (its map scaled to its own maximum, titled with its prediction; red when wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = ["input", *maps]
    figure, axes = plt.subplots(len(inputs), len(columns), figsize=(1.7 * len(columns), 1.75 * len(inputs) + 0.6),
                                squeeze=False)
    names = bundle.class_names
    for row, (image, label) in enumerate(zip(inputs, labels)):
        picture = _picture(image, bundle)
        axes[row, 0].imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
        axes[row, 0].set_title(f"true {names[label]}", fontsize=8)
        for column, role in enumerate(maps, start=1):
            predicted = int(predictions[role][row])
            heat = maps[role][row]
            axes[row, column].imshow(heat / heat.max() if heat.max() > 0 else heat, cmap="inferno", vmin=0, vmax=1)
            axes[row, column].set_title(f"{_TITLES.get(role, role)}: {names[predicted]}", fontsize=8,
                                        color="black" if predicted == label else "tab:red")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    sources = "; ".join(f"{_TITLES.get(role, role)}: attributions of {source}"
                        for role, source in attributed_with.items() if source != role)
    figure.suptitle(f"{method.replace('_', ' ')}: |attribution| for the true class"
                    + (f"\n{sources}" if sources else ""), fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return write_atomic(path, buffer.getvalue())
