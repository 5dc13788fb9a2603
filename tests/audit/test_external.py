"""``kdsec audit --members``: a model kdsec did not train, audited on the rows it trained on, through
the same attacks and gates as the pipeline's candidate. The canaries prove the membership gate can
see leakage: a model that memorized a small training set fails it at the default thresholds, a
well-generalized one passes; bad input is one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdsec.cli import app
from kdsec.config import DataConfig, TrainConfig
from kdsec.data import DATASETS
from kdsec.models import ModelSpec, build_model, save_checkpoint
from kdsec.train import accuracy, fit

SPEC = ModelSpec("he_mlp", (1, 8, 8), 10, {"hidden": [64]})
# The audit's own settings kept small (2 references, 20 bootstrap resamples); the gates stay at their defaults.
QUICK = ["--set", "audit.reference_models=2", "--set", "audit.bootstrap=20", "--set", "audit.extraction_queries=200"]


def _train(rows: np.ndarray, others: np.ndarray, train: TrainConfig, seed: int = 0):
    raw = DATASETS.get("digits")(DataConfig())
    torch.manual_seed(seed)
    model = build_model(SPEC)
    # early stopping on rows it never trains on (with patience = epochs: none)
    fit(model, raw.inputs[rows], raw.labels[rows], raw.inputs[others[:200]], raw.labels[others[:200]], train)
    return model.eval(), float(accuracy(model, raw.inputs[others], raw.labels[others]))


@pytest.fixture(scope="module")
def canaries(tmp_path_factory):
    """(folder, {name: (checkpoint, index file, accuracy on rows it never saw)})."""
    folder = tmp_path_factory.mktemp("canaries")
    rng = np.random.default_rng(0)
    order = rng.permutation(1797)
    made = {}
    # memorizing: 150 rows, 300 epochs, no early stopping, no augmentation, no weight decay
    small, rest = np.sort(order[:150]), order[150:]
    model, unseen = _train(small, rest, TrainConfig(epochs=300, patience=300, batch_size=32, lr=3e-3))
    made["memorizing"] = (save_checkpoint(model, SPEC, folder / "memorizing.safetensors"), small, unseen)
    # well generalized: half the rows, early stopping, weight decay
    half, rest = np.sort(order[:900]), order[900:]
    model, unseen = _train(half, rest, TrainConfig(epochs=40, patience=3, lr=1e-3, weight_decay=1e-3))
    made["generalized"] = (save_checkpoint(model, SPEC, folder / "generalized.safetensors"), half, unseen)
    np.save(folder / "memorizing.npy", made["memorizing"][1])
    (folder / "generalized.txt").write_text("\n".join(map(str, made["generalized"][1])) + "\n")
    return folder, made


def _audit(workdir: Path, *args: str):
    out = workdir / f"outputs-{len(list(workdir.glob('outputs-*')))}"  # one folder per audit
    result = CliRunner().invoke(app, ["audit", *args, *QUICK, "--out", str(out)], env={"COLUMNS": "200"})
    written = sorted(out.glob("audit-*/audit.json"))
    assert len(written) <= 1
    return result, (json.loads(written[0].read_text()) if written else None)


def test_a_memorizing_model_fails_the_membership_gate_and_a_generalized_one_passes(canaries, workdir):
    folder, made = canaries
    result, document = _audit(workdir, "--checkpoint", str(folder / "memorizing.safetensors"),
                              "--members", str(folder / "memorizing.npy"))
    assert result.exit_code == 2, result.output
    assert document["gates"]["membership"]["verdict"] == "fail" and "failed: membership" in result.output
    auc = max(attack["auc"] for attack in document["audit"]["attacks"].values())
    print(f"memorizing (150 rows, unseen accuracy {made['memorizing'][2]:.3f}): worst AUC {auc:.3f}")
    assert auc > 0.6 and document["members"] == 150 and document["architecture"] == "he_mlp"

    result, document = _audit(workdir, "--checkpoint", str(folder / "generalized.safetensors"),
                              "--members", str(folder / "generalized.txt"))
    auc = max(attack["auc"] for attack in document["audit"]["attacks"].values())
    tpr = max(attack["tpr_at_low_fpr"] for attack in document["audit"]["attacks"].values())
    print(f"generalized (900 rows, unseen accuracy {made['generalized'][2]:.3f}): worst AUC {auc:.3f}, TPR {tpr:.3f}")
    assert result.exit_code == 0, result.output
    assert document["gates"]["membership"]["verdict"] == "pass" and set(document["audit"]["attacks"]) == {
        "loss", "rmia", "lira"}


def test_a_model_logged_to_mlflow_is_audited_by_its_uri(canaries, workdir):
    """Any MLflow model URI holding one safetensors checkpoint: here a plain state dict (no kdsec
    header) in a run's artifacts, with its architecture given."""
    import mlflow
    from safetensors.torch import save_file

    from kdsec import tracking

    folder, made = canaries
    from kdsec.models import load_checkpoint

    model, _ = load_checkpoint(made["memorizing"][0])
    plain = workdir / "model" / "weights.safetensors"
    plain.parent.mkdir()
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(plain))
    tracking.connect()
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(plain.parent), "model")
    uri = f"runs:/{run.info.run_id}/model"
    result, document = _audit(workdir, "--model-uri", uri, "--members", str(folder / "memorizing.npy"),
                              "--arch", "he_mlp", "--arch-options", '{"hidden": [64]}')
    assert result.exit_code == 2, result.output
    assert document["model"] == uri and document["gates"]["membership"]["verdict"] == "fail"


@pytest.mark.parametrize("content, message", [
    (list(range(1800)), r"row 1797 is outside the dataset's rows 0\.\.1796"),  # another dataset's index file
    ([5, 6, 7, 5] + list(range(100, 120)), "row 5 is listed 2 times"),
    ([-1] + list(range(100, 120)), "row -1 is outside"),
    ("1\n2\nthree\n", "'three' is not a row index"),
    (list(range(1790)), "lists 1790 of the dataset's 1797 rows; an audit needs at least 10 members and 40 rows"),
    ("", "lists no rows"),
])
def test_an_index_file_that_does_not_match_the_dataset_is_one_line(canaries, workdir, content, message):
    folder, _ = canaries
    index = workdir / "rows.txt"
    index.write_text(content if isinstance(content, str) else "\n".join(map(str, content)))
    result, document = _audit(workdir, "--checkpoint", str(folder / "memorizing.safetensors"), "--members", str(index))
    assert result.exit_code == 1 and document is None
    import re

    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and len(result.output.split("error: ")) == 2, result.output
    assert re.search(message, line), line


def test_a_float_array_index_a_foreign_architecture_and_an_unresolvable_uri_are_one_line(canaries, workdir):
    folder, made = canaries
    np.save(workdir / "rows.npy", made["memorizing"][1].astype(np.float64))
    import io

    archive = io.BytesIO()
    np.savez(archive, rows=made["memorizing"][1])
    (workdir / "archive.npy").write_bytes(archive.getvalue())  # an .npz under an .npy name
    mnist = save_checkpoint(build_model(ModelSpec("he_mlp", (1, 28, 28), 10, {"hidden": [64]})), SPEC,
                            workdir / "spec-lies.safetensors")  # weights of a 784-input model, header of a 64-input one
    wide = save_checkpoint(build_model(ModelSpec("he_mlp", (1, 28, 28), 10, {"hidden": [64]})),
                           ModelSpec("he_mlp", (1, 28, 28), 10, {"hidden": [64]}), workdir / "mnist.safetensors")
    cases = [
        (["--checkpoint", str(folder / "memorizing.safetensors"), "--members", str(workdir / "rows.npy")],
         "must hold one row of integers"),
        (["--checkpoint", str(mnist), "--members", str(folder / "memorizing.npy")],
         "does not load as the architecture its header names"),
        (["--checkpoint", str(wide), "--members", str(folder / "memorizing.npy")],
         r"is a he_mlp for inputs \(1, 28, 28\) and 10 classes; data 'digits' has \(1, 8, 8\)"),
        (["--checkpoint", str(folder / "memorizing.safetensors"), "--members", str(folder / "memorizing.npy"),
          "--arch", "student_cnn"], "does not load as a student_cnn with these options: missing"),
        (["--checkpoint", str(folder / "memorizing.safetensors"), "--members", str(workdir / "archive.npy")],
         r"is an \.npz archive, not one \.npy array"),
        (["--model-uri", "runs:/0123456789abcdef0123456789abcdef/model", "--members",
          str(folder / "memorizing.npy")], "does not resolve"),
        (["--checkpoint", str(folder / "memorizing.safetensors")], "--checkpoint/--model-uri with --members"),
    ]
    import re

    for args, message in cases:
        result, document = _audit(workdir, *args)
        assert result.exit_code == 1 and document is None, result.output
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and len(result.output.split("error: ")) == 2, result.output
        assert re.search(message, line), line
