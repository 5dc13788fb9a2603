"""The real kd-pipeline flow under Prefect's test harness, on digits, with a temporary MLflow
store; and the `kdsec run` command as a user runs it (a subprocess, exit codes and all)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from sklearn.datasets import load_digits

from flows.kd_pipeline import kd_pipeline
from kdsec import tracking
from kdsec.audit.run import reference_checkpoint
from kdsec.config import load_config
from kdsec.data import prepare_data
from kdsec.gates import AUDIT_GATES
from kdsec.summary import read_summary
from tests.conftest import SMALL_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One working directory (MLflow store, outputs, key file) shared by the runs below, in order."""
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture
def in_store(store, monkeypatch):
    monkeypatch.chdir(store)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    return store


def _flow(*extra: str) -> dict:
    with prefect_test_harness(server_startup_timeout=120):
        return kd_pipeline(config=load_config(None, [*SMALL_OVERRIDES, *extra]).model_dump(mode="json"))


def _cli(store: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "kdsec.cli", "run"]
    for override in [*SMALL_OVERRIDES, *extra]:
        args += ["--set", override]
    return subprocess.run(args, cwd=store, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_passing_run_promotes_champion(in_store):
    summary = _flow()
    assert summary.verdict == "pass" and summary.promoted and summary.failed_gates == []
    assert set(summary.gates) == {"accuracy", "membership", "he", "at_rest", "extraction", "calibration",
                                  "explanation", "dp_audit"}
    assert summary.gates["dp_audit"].checks[0].level == "skipped"  # no DP student in this run
    assert summary.data.splits == {"train": 897, "val": 180, "test": 360, "holdout": 360, "transfer": 0}
    assert summary.models["teacher"].test_accuracy > 0.9
    assert summary.he.agreement >= 0.99 and summary.he.samples == 128
    assert {"teacher", "scratch_student", "kd_student", "candidate"} <= set(summary.audit)
    assert {f"variant:{v['name']}" for v in summary.variants if v["name"] != "dense"} <= set(summary.audit)
    candidate_audit = summary.audit["candidate"]
    assert set(candidate_audit.attacks) == {"loss", "rmia", "lira"}
    strongest = candidate_audit.membership
    assert strongest.tpr_at_low_fpr == max(a.tpr_at_low_fpr for a in candidate_audit.attacks.values())
    # The membership gate reads each metric at its worst over the attacks and names the attack; the
    # he gate also reads agreement with the shipped model and the host's lack of a secret key.
    checks = {check.metric: check for gate in summary.gates.values() for check in gate.checks}
    worst_auc = checks["candidate.membership_auc"]
    assert worst_auc.value == max(a.auc for a in candidate_audit.attacks.values())
    assert candidate_audit.attacks[worst_auc.source].auc == worst_auc.value
    assert checks["he.agreement_with_model"].value >= 0.99 and checks["he.agreement_with_model"].source
    assert checks["he.host_had_no_secret_key"].value == 1.0
    candidate_variant = next(v for v in summary.variants if v["name"] == summary.candidate.variant)
    assert summary.candidate.val_accuracy == candidate_variant["val_accuracy"]
    assert summary.audit_timing.seconds > 0
    explanations = summary.explanations  # every audited model explained against the teacher
    assert set(summary.audit) <= set(explanations.models) and explanations.method == "saliency"
    assert summary.gates["explanation"].checks[0].value == explanations.candidate.methods["saliency"].spearman
    assert Path(explanations.figure).is_file()
    audit_json = json.loads((Path(summary.output_dir) / "audit.json").read_text())
    assert audit_json["models"]["candidate"]["membership"]["auc"] == strongest.auc
    assert audit_json["lineage"]["data"]["fingerprint"] == summary.data.fingerprint
    assert Path(summary.report.html).read_text().count("data:image/png;base64") == 4  # + the attribution grid
    assert json.loads(Path(summary.summary_path).read_text())["run_id"] == summary.run_id
    # Strict JSON (JavaScript's JSON.parse would refuse NaN): empty calibration bins are null.
    def refuse(constant):
        raise AssertionError(f"{constant} in a file that must be strict JSON")

    for name in ("summary.json", "audit.json"):
        json.loads((Path(summary.output_dir) / name).read_text(), parse_constant=refuse)
    assert read_summary(Path(summary.summary_path)).headlines() == summary.headlines()

    client = MlflowClient()
    version = client.get_model_version_by_alias("kdsec-student", "champion")
    assert str(version.version) == str(summary.registry.version)
    assert version.tags["gates"] == "pass"
    assert all(version.tags[f"gate.{gate}"] == "pass" for gate in summary.gates)

    # Nested runs per stage under one parent, with the summary, config and dataset logged.
    parent = client.get_run(summary.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'")
    assert {"data", "teacher", "scratch_student", "kd_student", "compress", "encrypt-at-rest", "homomorphic",
            "audit", "explain", "register"} <= {run.info.run_name for run in children}
    assert {"summary.json", "config.yaml", "report"} <= {a.path for a in client.list_artifacts(summary.run_id)}
    by_name = {run.info.run_name: run for run in children}
    # Stage runs carry their stage's real span (they are recorded after the stage ran), in order.
    spans = {name: (run.info.start_time, run.info.end_time) for name, run in by_name.items()}
    assert spans["audit"][1] - spans["audit"][0] >= 900 * summary.audit_timing.seconds
    assert spans["teacher"][1] - spans["teacher"][0] >= 900 * summary.models["teacher"].train_seconds
    assert spans["data"][0] <= spans["teacher"][0] <= spans["compress"][0] <= spans["audit"][0]
    report = Path(summary.report.html).read_text()
    assert f"/runs/{summary.run_id}" in report and f"/versions/{summary.registry.version}" in report
    assert {"manifest.json", "model.json", "weights.safetensors.enc"} <= {
        a.path for a in client.list_artifacts(by_name["encrypt-at-rest"].info.run_id)}
    assert {"he_package.json", "encrypted_model.weights.bin", "encrypted_model.public_context.bin",
            "encrypted_input.public_context.bin"} <= {a.path for a in client.list_artifacts(by_name["homomorphic"].info.run_id)}
    assert {(r["mode"], r["path"]) for r in summary.he.runs} == {
        ("encrypted_input", "batched"), ("encrypted_input", "single"), ("encrypted_model", "batched")}
    assert not summary.he.host_had_secret_key
    # The package in the run folder opens with the project's keys and holds the candidate's exact bytes.
    from kdsec.crypto.keys import load_or_create_signer, local_key_provider
    from kdsec.crypto.package import open_package
    package = open_package(Path(summary.at_rest.package_path),
                           local_key_provider("KDSEC_MODEL_KEY", ".kdsec/keys/model.key", create=False),
                           load_or_create_signer("KDSEC_SIGNING_KEY", ".kdsec/keys/signing.pem").public)
    candidate = next(v for v in summary.variants if v["name"] == summary.candidate.variant)
    assert package["weights.safetensors"] == Path(candidate["checkpoint"]).read_bytes()
    assert version.tags["package.kek_id"] == summary.at_rest.kek_id
    assert parent.inputs.dataset_inputs[0].dataset.digest == summary.data.fingerprint

    # The registered model predicts labels from raw 0-16 pixels, as numpy or DataFrame, of any
    # integer or float dtype a client may hold: the same labels on all 1,797 digits each way.
    model = mlflow.pyfunc.load_model("models:/kdsec-student@champion")
    digits = load_digits()
    predictions = model.predict(digits.data)
    assert (predictions == digits.target).mean() > 0.85
    for dtype in (np.float64, np.float32, np.int64, np.int32, np.uint8):
        values = digits.data.astype(dtype)
        assert np.array_equal(model.predict(values), predictions), dtype
        assert np.array_equal(model.predict(pd.DataFrame(values)), predictions), dtype
    with pytest.raises(Exception, match="must be integers or floats; got <U"):
        model.predict(digits.data[:5].astype(str))
    # Its output signature and input example are logged (an input schema would refuse every dtype
    # but one); pixels outside 0-16, or already scaled to 0-1, are refused instead of mislabelled.
    assert model.metadata.get_output_schema() is not None and model.metadata.get_input_schema() is None
    assert model.metadata.saved_input_example_info is not None
    with pytest.raises(Exception, match=r"raw values in \[0, 16\]"):
        model.predict(digits.data[:5] * 2)
    with pytest.raises(Exception, match=r"look scaled to \[0, 1\]"):
        model.predict(digits.data[:5] / 16)
    # What a reviewer sees in the registry: verdict first, a description, the pipeline run as source.
    assert version.tags["verdict"] == "PASSED"
    assert client.get_run(summary.run_id).data.tags["kdsec.registered_version"] == f"kdsec-student/{version.version}"
    assert version.description.startswith("PASSED") and f"runs:/{summary.run_id}/report/report.html" in version.description
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    named = client.get_run(summary.run_id).info.run_name
    assert named.startswith(f"digits-{summary.candidate.variant}-PASS-")

    # The key never reaches the summary or MLflow.
    key = (in_store / ".kdsec" / "keys" / "model.key").read_text().strip()
    assert key not in summary.model_dump_json()
    assert key not in json.dumps(parent.data.params) + json.dumps(parent.data.tags)


def test_champion_served_over_rest_takes_ints_floats_and_dataframes(in_store):
    """``mlflow models serve`` on the champion (the first test's), as a team would serve it: JSON
    integers, floats and a split DataFrame all give the labels the pyfunc client gives."""
    import socket
    import signal
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/kdsec-student@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=in_store, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{in_store / 'mlflow.db'}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{url}/invocations", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
            time.sleep(1)
        digits = load_digits()
        expected = mlflow.pyfunc.load_model("models:/kdsec-student@champion").predict(digits.data)
        as_ints = digits.data.astype(int).tolist()
        for payload in ({"inputs": as_ints}, {"inputs": (digits.data.astype(np.float32)).tolist()},
                        {"dataframe_split": {"columns": list(range(64)), "data": as_ints}}):
            status, body = post(payload)
            assert status == 200, body
            assert np.array_equal(np.asarray(body["predictions"]), expected)
        # MLflow's scoring server answers a model's own error with a generic message; our line is
        # the last of the trace it returns beside it.
        status, body = post({"inputs": (digits.data[:3] * 2).tolist()})
        assert status == 400, body
        assert "raw values in [0, 16]" in body["stack_trace"].strip().splitlines()[-1]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_second_run_reuses_the_cached_teacher_and_sweeps_on_threads(in_store):
    """A 2×2 grid (temperature × student width) as parallel thread tasks from one stored signal
    file: the cached teacher and the cached signals are reused, every member is a nested run
    under the `sweep` stage run, and the best by validation accuracy becomes the KD student."""
    summary = _flow("sweep.temperature=[2,4]", "sweep.width=[0.5,1]")
    assert summary.teacher_cache == "hit"
    # The teacher signals come from the first run's cache too (one logits file serves every member).
    cache = summary.cache
    assert cache["signals"] == {"hit": 1, "total": 1} and cache["references"]["total"] > 0
    sweep = summary.sweep
    assert sweep["task_runner"] == "threads" and len(sweep["members"]) == 4
    best = max(sweep["members"], key=lambda m: (m["val_accuracy"], -m["params"]))
    assert sweep["best"] == best["name"]
    assert summary.distillation["temperature"] == best["temperature"]
    assert summary.models["kd_student"].params == best["params"]
    assert summary.models["scratch_student"].params == best["params"]  # baseline of the same size
    assert list(summary.distillation["signals"]) == ["logits"]

    client = MlflowClient()
    assert {"sweep/comparison.md", "sweep/comparison.csv", "sweep/pareto.png"} <= {
        a.path for a in client.list_artifacts(summary.run_id, "sweep")}
    members = client.search_runs([client.get_run(summary.run_id).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{sweep['run_id']}'")
    assert {run.info.run_name for run in members} == {m["name"] for m in sweep["members"]}
    assert [run.info.run_name for run in members if run.data.tags["sweep.best"] == "true"] == [sweep["best"]]
    assert all(run.data.metrics["val_accuracy"] > 0.5 for run in members)
    html = Path(summary.report.html).read_text()
    assert f"best by validation accuracy: <b>{sweep['best']}</b>" in html
    assert html.count("data:image/png;base64") == 5  # the sweep's Pareto plot and the attribution grid too


def test_cli_impossible_threshold_exits_2_and_keeps_champion(in_store):
    client = MlflowClient()
    before = str(client.get_model_version_by_alias("kdsec-student", "champion").version)
    # Cached entries whose files were deleted since: computed again, counted as misses.
    cache = in_store / ".kdsec" / "cache"
    config = load_config(None, [*SMALL_OVERRIDES, "gates.min_accuracy=1.0"])
    # One of this config's own reference models (the store also caches other configs' ones).
    reference = in_store / reference_checkpoint(config, prepare_data(config.data), "student", 1)
    assert reference.is_file()
    gone = [*(cache / "teachers").rglob("teacher.safetensors"), *(cache / "signals").glob("*.safetensors"), reference]
    for path in gone:
        path.unlink()
    result = _cli(in_store, "gates.min_accuracy=1.0")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gate(s) failed: accuracy" in result.stdout
    summary_path = next(line.split("summary:", 1)[1].strip() for line in result.stdout.splitlines()
                        if line.startswith("summary:"))
    summary = read_summary(in_store / summary_path)
    assert summary.verdict == "fail" and not summary.promoted and summary.failed_gates == ["accuracy"]
    assert all(path.is_file() for path in gone)
    assert summary.teacher_cache == summary.cache["teacher"] == "miss"
    assert summary.cache["signals"]["hit"] == 0
    assert summary.cache["references"]["hit"] == summary.cache["references"]["total"] - 1
    assert str(client.get_model_version_by_alias("kdsec-student", "champion").version) == before
    failed = client.get_model_version("kdsec-student", str(summary.registry.version))
    assert failed.tags["gates"] == "fail" and failed.tags["gate.accuracy"] == "fail"
    assert failed.tags["verdict"] == "FAILED" and failed.description.startswith("FAILED: candidate.test_accuracy")
    assert "champion" not in (failed.aliases or [])


@pytest.mark.parametrize(("extra", "env", "message"), [
    (["distill.temperature=-2"], {}, "config key 'distill.temperature': Input should be greater than 0"),
    (["distill.temprature=2"], {}, "unknown config key 'distill.temprature'"),
    (["--config", "missing.yaml"], {}, "config file 'missing.yaml' not found"),
    ([], {"KDSEC_MODEL_KEY": "not-a-key"}, "$KDSEC_MODEL_KEY must hold a 32-byte key"),
    (["student.arch=student_cnn"], {}, "student.arch 'student_cnn' has no homomorphic form (ReLU, max-pool); "
                                       "use an HE-friendly student (he_mlp, he_cnn) or set encrypt.he.enabled=false"),
    (["student.arch=resnet18", "encrypt.he.enabled=false"], {},
     "compress.structured: structured pruning supports he_mlp, he_cnn, teacher_cnn, student_cnn, not the 'resnet18' "
     "student"),
])
def test_cli_errors_exit_1_with_one_line_and_register_nothing(in_store, extra, env, message):
    versions = len(MlflowClient().search_model_versions("name='kdsec-student'"))
    args = [item for pair in (("--set", e) if not e.startswith("--") and "=" in e else (e,) for e in extra)
            for item in pair]
    result = subprocess.run([sys.executable, "-m", "kdsec.cli", "run", *args], cwd=in_store, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "300", **env})
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(MlflowClient().search_model_versions("name='kdsec-student'")) == versions


def _kdsec(*args: str, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from kdsec.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})
    return result.exit_code, result.output


def test_approval_required_waits_for_a_reviewer(in_store):
    client = MlflowClient()
    champion = str(client.get_model_version_by_alias("kdsec-student", "champion").version)
    # Also: a separate transfer set for distillation and the DP-SGD defense, end to end.
    summary = _flow("tracking.require_approval=true", "data.transfer_fraction=0.25", "distill.transfer_set=transfer",
                    "student.dp.enabled=true", "student.dp.epochs=5", "student.dp.target_epsilon=2")
    version = str(summary.registry.version)
    assert summary.verdict == "pass" and not summary.promoted and summary.registry.awaiting_review
    assert summary.data.splits["transfer"] == summary.teacher_leakage["transfer_split_size"] > 400
    leakage = summary.teacher_leakage["students"]
    assert leakage["kd_student"]["trained_on"] == "transfer" and leakage["scratch_student"]["trained_on"] == "train"
    assert summary.audit["teacher"].teacher_leakage is None
    defense = summary.privacy_defense
    assert defense["enabled"] and 0 < defense["epsilon"] <= 2.0 * 1.01
    assert summary.models["dp_student"].privacy["epsilon"] == defense["epsilon"]
    written = json.loads(Path(summary.summary_path).read_text())["models"]
    assert isinstance(written["dp_student"]["privacy"]["steps"], int)
    assert all("privacy" not in written[role] for role in written if role != "dp_student")
    report = Path(summary.report.markdown).read_text()
    assert "Teacher leakage through the students" in report and f"ε = {defense['epsilon']:.2f}" in report
    # the one-run DP audit: two canary copies (DP-SGD, plain), the DP claim checked by its gate
    private, plain = defense["dp_audit"]
    assert (private["model"], plain["model"]) == ("dp_student", "non_dp_student")
    assert private["canaries"] == 256 and private["guesses"] == 128 and plain["accountant_epsilon"] is None
    assert private["claim"] == "holds" and private["epsilon_lower"] <= private["accountant_epsilon"] < private["ceiling"]
    assert summary.gates["dp_audit"].verdict == "pass" and summary.gates["dp_audit"].checks[0].level == "pass"
    assert "One-run DP audit" in report and "non_dp_student" in report
    assert str(client.get_model_version_by_alias("kdsec-student", "candidate").version) == version
    assert str(client.get_model_version_by_alias("kdsec-student", "champion").version) == champion
    assert client.get_model_version("kdsec-student", version).tags["review.status"] == "pending"

    code, out = _kdsec("review", "approve", version, "--comment", "audit read")
    assert code == 0, out
    tags = client.get_model_version("kdsec-student", version).tags
    # A local store authenticates nobody: the decision is recorded, marked unauthenticated.
    assert tags["review.status"] == "approved" and tags["review.reviewer"].startswith("local:")
    assert tags["review.authenticated"] == "false" and tags["kdsec.launched_by"] == tags["review.reviewer"]
    # The pipeline's signed verdict: who triggered the run (here: whoever ran it) and the audit.json read.
    from kdsec.crypto.attestation import trusted_key

    verdict = tracking.attested_verdict(client.get_model_version("kdsec-student", version),
                                        trusted_key(None, ".kdsec/keys/signing.pem"))
    assert verdict.passed and verdict.trigger == "direct" and verdict.triggered_by == tags["kdsec.launched_by"]
    assert verdict.audit_sha256 == tags["review.audit_sha256"]
    run = client.get_run(summary.run_id)
    audit = client.download_artifacts(run.info.run_id, "report/audit.json", str(in_store))
    assert tags["review.audit_sha256"] == hashlib.sha256(Path(audit).read_bytes()).hexdigest()
    assert json.loads(tags["review.history"])[-1]["comment"] == "audit read"
    assert str(client.get_model_version_by_alias("kdsec-student", "champion").version) == version
    assert not [v for v in client.search_model_versions("name='kdsec-student'") if "candidate" in v.aliases]


def test_a_failed_version_cannot_be_approved(in_store):
    failed = next(str(v.version) for v in MlflowClient().search_model_versions("name='kdsec-student'")
                  if v.tags.get("gates") == "fail")
    code, out = _kdsec("review", "approve", failed)
    assert code == 1 and "did not pass its gates" in out
    code, out = _kdsec("review", "reject", failed, "--comment", "membership too high")
    assert code == 0 and "rejected" in out


def test_report_compares_two_versions_and_reaudit_reproduces_the_audit(in_store):
    code, out = _kdsec("report", "champion", "--compare", "1", "--out", "reports")
    assert code == 0, out
    assert "membership AUC" in out and (in_store / "reports").is_dir()
    # The verdict, the aliases and the review state come first, not only paths.
    assert ": PASS" in out.splitlines()[0]
    assert "champion" in out.split("aliases:", 1)[1].split("·", 1)[0]
    assert all(gate in out for gate in ("accuracy", "membership", "calibration")) and "warns unless" in out
    reviewed = MlflowClient().get_model_version_by_alias("kdsec-student", "champion")
    assert f"review: {reviewed.tags.get('review.status', 'not required')}" in out
    # --compare names the config keys whose values differ between the two runs.
    runs = {summary.registry.version: yaml.safe_load((Path(summary.output_dir) / "config.yaml").read_text())
            for summary in map(read_summary, (in_store / "outputs").rglob("summary.json"))}

    def leaves(tree, prefix=""):
        return {key: value for name, node in tree.items()
                for key, value in (leaves(node, f"{prefix}{name}.").items() if isinstance(node, dict)
                                   else [(f"{prefix}{name}", node)])}

    left, right = leaves(runs[str(reviewed.version)]), leaves(runs["1"])
    differing = {key for key in set(left) | set(right) if left.get(key) != right.get(key)}
    if differing:
        assert all(f"{key}:" in out for key in differing), (differing, out)
    else:
        assert "config: the same in both versions" in out
    # --open where no browser can be opened says where the report is.
    code, out = _kdsec("report", "champion", "--open", "--out", "reports", env={"BROWSER": "false"})
    assert code == 0 and "no browser could be opened here; the report is at" in out
    assert list((in_store / "reports").rglob("report.html")) and list((in_store / "reports").rglob("audit.json"))

    champion = MlflowClient().get_model_version_by_alias("kdsec-student", "champion")
    code, out = _kdsec("audit", "--model-uri", "models:/kdsec-student@champion", "--out", "reaudit")
    # The champion passed every gate in its run; alone, on the same data, seeds and cached
    # reference models, its audit gates pass again (exit 0) with the same figures.
    assert code == 0, out
    document = json.loads(next((in_store / "reaudit").rglob("audit.json")).read_text())
    run_summary = next(summary for summary in map(read_summary, (in_store / "outputs").rglob("summary.json"))
                       if summary.registry.version == str(champion.version))
    assert set(document["gates"]) == set(AUDIT_GATES)
    for gate in AUDIT_GATES:
        assert document["gates"][gate]["verdict"] == run_summary.gates[gate].verdict == "pass"
        again = {check["metric"]: check["value"] for check in document["gates"][gate]["checks"]}
        assert again == pytest.approx({check.metric: check.value for check in run_summary.gates[gate].checks})
    assert document["audit"]["membership"]["auc"] == pytest.approx(run_summary.audit["candidate"].membership.auc)
    tags = MlflowClient().get_model_version("kdsec-student", str(champion.version)).tags
    assert tags["reaudit.verdict"] == "pass"
    membership = {check.metric: check for check in run_summary.gates["membership"].checks}
    assert tags["reaudit.membership_auc_attack"] == membership["candidate.membership_auc"].source
    assert tags["reaudit.membership_tpr_attack"] == membership["candidate.membership_tpr_at_low_fpr"].source


def test_conv_student_ships_without_homomorphic_inference_when_he_is_off(in_store):
    """The seed's CNN student end to end: HE off (it has no homomorphic form), so the he gate is
    skipped, not failed; its variants include static int8 on oneDNN kernels, measured on one
    sample and on a batch."""
    summary = _flow("student.arch=student_cnn", "encrypt.he.enabled=false")
    assert summary.he.model_dump() == {"enabled": False, "agreement": None, "accuracy": None, "samples": 0,
                                       "ms_per_sample": None, "single_sample_ms": None,
                                       "host_had_secret_key": False, "runs": []}
    he_check = summary.gates["he"].checks[0]
    assert he_check.level == "skipped" and he_check.value is None
    assert summary.verdict == "pass" and summary.promoted
    variants = {v["name"]: v for v in summary.variants}
    assert {"static_int8", "structured50_static_int8", "pruned50_static_int8"} <= set(variants)
    assert variants["static_int8"]["size_bytes"] < 0.35 * variants["dense"]["size_bytes"]
    assert variants["static_int8"]["test_accuracy"] >= variants["dense"]["test_accuracy"] - 0.02
    assert all(v["batch_latency_ms"] > 0 for v in variants.values())
    assert variants["structured50"]["flops"] < variants["dense"]["flops"]
    report = Path(summary.report.markdown).read_text()
    assert "Homomorphic (CKKS): **off**" in report and "ms, batch of 256" in report
    # The champion now is whichever CNN variant was smallest and passing; served from raw pixels.
    model = mlflow.pyfunc.load_model("models:/kdsec-student@champion")
    digits = load_digits()
    assert (model.predict(digits.data[:300]) == digits.target[:300]).mean() > 0.9
