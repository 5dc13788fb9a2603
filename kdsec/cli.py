"""The ``kdsec`` command.

``kdsec run`` exits 0 when the candidate was promoted, 2 when the run completed but a gate
failed (nothing promoted), 1 on any error (one line on stderr).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdsec.config import load_config
from kdsec.errors import ConfigError, KdsecError
from kdsec.he_cli import app as he_token_app
from kdsec.he_cli import serve as he_serve

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil, compress, encrypt and audit a student model; promote it only through gates.")
console = Console()
err = Console(stderr=True)

EXIT_PROMOTED, EXIT_ERROR, EXIT_GATE_FAILED = 0, 1, 2
app.add_typer(he_token_app, name="he-token")
app.command("he-serve")(he_serve)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_ERROR)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: configs/default.yaml)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="dotted.key=value, repeatable")] = None,
) -> None:
    """Run the kd-pipeline flow: data → teacher → KD student → compress → encrypt → audit → gates → registry."""
    from kdsec.preflight import preflight

    try:
        resolved = load_config(config, overrides or [])
        preflight(resolved)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    # No telemetry calls (a machine may have no internet; Prefect would print an error line).
    for setting in ("PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_ENABLE_TELEMETRY"):
        os.environ.setdefault(setting, "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # kdsec logs epoch progress through the "kdsec" logger; let Prefect show it with its own.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kdsec")
    # The first start of the temporary Prefect server migrates its database; on a busy 2-core
    # machine that can exceed Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    logging.getLogger("kdsec").setLevel(logging.INFO)
    # The CLI is the one place in kdsec that reaches the orchestration layer, lazily, so that
    # importing the library never imports Prefect.
    if os.environ.get("KDSEC_LOCAL_SERVER") == "1" and not os.environ.get("PREFECT_API_URL"):
        from flows import local_server  # before Prefect reads its settings: sets PREFECT_API_URL

        try:
            url = local_server.ensure()
        except (OSError, RuntimeError) as exc:
            raise _fail(str(exc)) from None
        err.print(f"Prefect: local server {url.removesuffix('/api')} (its UI keeps the run history; "
                  "stop it with: make prefect-stop)", highlight=False)
    from flows.kd_pipeline import kd_pipeline, start_temporary_server

    try:
        start_temporary_server()
        summary = kd_pipeline(config=resolved.model_dump(mode="json"))
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the last line a user sees must say what broke
        raise _fail(f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    _print_summary(summary)
    raise typer.Exit(EXIT_PROMOTED if summary.passed else EXIT_GATE_FAILED)


def _print_summary(summary) -> None:
    """What a run ended with (a ``kdsec.summary.Summary``): the gate table, the headline
    figures, what happened in the registry, and where the report is."""
    from kdsec import roles

    table = Table(title=f"kd-pipeline — {summary.verdict.upper()}", title_justify="left")
    for column in ("gate", "verdict", "metric", "value", "threshold"):
        table.add_column(column, justify="left" if column in ("gate", "metric") else "right")
    for name, gate in summary.gates.items():
        for check in gate.checks:
            value = "missing" if check.value is None else f"{check.value:.4f}"
            value += f" ({check.source})" if check.source else ""
            style = {"pass": "green", "warn": "yellow", "fail": "bold red"}.get(check.level, "dim")
            table.add_row(name, f"[{style}]{check.level}[/]", check.metric, value,
                          f"{check.direction} {check.threshold:.4f}")
    console.print(table)
    models = summary.models
    console.print(
        f"accuracy: teacher {models[roles.TEACHER].test_accuracy:.4f} · scratch student "
        f"{models[roles.SCRATCH_STUDENT].test_accuracy:.4f} · KD student {models[roles.KD_STUDENT].test_accuracy:.4f}"
        f" · candidate [b]{summary.candidate.variant}[/] {summary.candidate.test_accuracy:.4f}"
        f" (teacher cache: {summary.teacher_cache})")
    cache = summary.cache
    if "references" in cache:
        console.print(f"cache: teacher {cache['teacher']} · teacher signals {cache['signals']['hit']}/"
                      f"{cache['signals']['total']} reused · reference models {cache['references']['hit']}/"
                      f"{cache['references']['total']} reused")
    from kdsec.gates import Metric, membership_worst_case

    attacks = summary.candidate_audit.attacks
    worst = membership_worst_case(attacks)
    (auc_attack, auc), (tpr_attack, tpr) = worst[Metric.MEMBERSHIP_AUC], worst[Metric.MEMBERSHIP_TPR]
    console.print(f"audit: membership on the candidate, worst case over {len(attacks)} attacks: AUC {auc:.3f} "
                  f"({auc_attack}), TPR {tpr:.3f} at {attacks[tpr_attack].low_fpr} FPR ({tpr_attack}); "
                  f"{summary.audit_timing.seconds:.1f} s, "
                  f"{summary.audit_timing.ratio_to_teacher_training:.2f}× teacher training")
    for result in summary.extraction:
        console.print(f"extraction ({result['defense']}): copy accuracy {result['stolen_accuracy']:.4f}, "
                      f"fidelity {result['fidelity']:.4f}")
    if not summary.he.enabled:
        console.print("HE: off (encrypt.he.enabled: false)")
    for run in summary.he.runs:
        console.print(f"HE {run['mode']} ({run['path']}): agreement {run['agreement']:.4f}, "
                      f"{run['ms_per_sample']:.2f} ms/sample on {run['samples']} samples")
    registry = summary.registry
    if summary.promoted:
        console.print(f"[green]promoted[/]: {registry.model} version {registry.version} is now '{registry.alias}'")
    elif registry.superseded_by:
        console.print(f"[yellow]passed, not promoted[/]: version {registry.superseded_by} of {registry.model}, "
                      f"from a run that started later, already holds the alias (this run is version "
                      f"{registry.version})")
    elif registry.awaiting_review:
        console.print(f"[yellow]awaiting review[/]: every gate passed; {registry.model} version "
                      f"{registry.version} is '{registry.candidate_alias}'. Approve with: kdsec review approve "
                      f"{registry.version} --comment TEXT (as a reviewer: MLFLOW_TRACKING_USERNAME)")
    else:
        console.print(f"[red]not promoted[/]: gate(s) failed: {', '.join(summary.failed_gates)}; "
                      f"'{registry.alias}' stays at version {registry.previous_champion or 'none'} "
                      f"(this run is version {registry.version}, tagged gates=fail)")
    console.print(f"report:  {summary.report.html}\n         {summary.report.markdown}")
    console.print(f"summary: {summary.summary_path}")


# --- protected packages -------------------------------------------------------------------------

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="config whose encrypt.* keys to use")]
KeyFileOption = Annotated[Optional[Path], typer.Option("--key-file", help="KEK file (default: encrypt.key_file)")]
KeyEnvOption = Annotated[Optional[str], typer.Option("--key-env", help="env var holding the KEK (default: encrypt.key_env)")]
PublicKeyOption = Annotated[Optional[Path], typer.Option(
    "--public-key", help="trusted ECDSA P-256 public key (PEM); default: the .pub of encrypt.signing_key_file")]


def _encrypt_config(config: Optional[Path]):
    return load_config(config, []).encrypt


def _provider(encrypt_cfg, key_env: Optional[str], key_file: Optional[Path], create: bool = False):
    from kdsec.crypto.keys import local_key_provider

    # An explicit --key-file wins over the configured env var; an explicit --key-env over both.
    env = key_env if key_env is not None else (None if key_file is not None else encrypt_cfg.key_env)
    return local_key_provider(env, key_file or encrypt_cfg.key_file, create=create)


def _trusted_key(encrypt_cfg, public_key: Optional[Path]):
    from kdsec.crypto.keys import load_or_create_signer, load_public_key, public_key_path

    if public_key is not None:
        return load_public_key(public_key)
    if os.environ.get(encrypt_cfg.signing_key_env):
        return load_or_create_signer(encrypt_cfg.signing_key_env, encrypt_cfg.signing_key_file).public
    pub = public_key_path(Path(encrypt_cfg.signing_key_file))
    if pub.exists():
        return load_public_key(pub)
    raise KdsecError(f"no trusted public key: pass --public-key PATH (the signer's .pub), or set "
                     f"${encrypt_cfg.signing_key_env} / create {encrypt_cfg.signing_key_file}")


@app.command()
def encrypt(
    checkpoint: Annotated[Path, typer.Argument(help="a kdsec safetensors checkpoint (float or int8)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="package folder to create (must not exist)")],
    name: Annotated[Optional[str], typer.Option(help="model name bound into the package")] = None,
    version: Annotated[str, typer.Option(help="model version bound into the package")] = "1",
    config: ConfigOption = None, key_file: KeyFileOption = None, key_env: KeyEnvOption = None,
) -> None:
    """Seal a checkpoint into a signed, envelope-encrypted package."""
    import json as json_module

    from kdsec.compress import load_weights
    from kdsec.crypto.keys import load_or_create_signer
    from kdsec.crypto.package import create_package

    try:
        resolved = load_config(config, [])
        if not checkpoint.is_file():
            raise KdsecError(f"checkpoint '{checkpoint}' not found")
        _, spec, weight_format = load_weights(checkpoint)  # refuse anything that is not a kdsec checkpoint
        provider = _provider(resolved.encrypt, key_env, key_file, create=True)
        signer = load_or_create_signer(resolved.encrypt.signing_key_env, resolved.encrypt.signing_key_file)
        card = {"format": weight_format, "spec": json_module.loads(spec.to_json()), "source": checkpoint.name}
        info = create_package(out, {"weights.safetensors": checkpoint.read_bytes()},
                              {"model.json": json_module.dumps(card, indent=2, sort_keys=True).encode()},
                              name=name or resolved.tracking.registered_model, version=version,
                              provider=provider, signer=signer)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]sealed[/] {checkpoint} → {info.path} (model {info.model} v{info.version}, "
                  f"KEK {', '.join(info.kek_ids)}, signer {info.signer_key_id})")


RUN_ID = re.compile(r"[0-9a-f]{32}")


def _print_registered(package_version: str) -> None:
    """Which registry version ships this package, where a tracking store is at hand (the package
    itself is sealed before registration, so it records its run, not its version). A tracking
    server that does not answer at once is not waited for: the package checks stand on their own."""
    if not (os.environ.get("MLFLOW_TRACKING_URI") or Path("mlflow.db").is_file()):
        console.print("registry: no tracking store here (set MLFLOW_TRACKING_URI) — not looked up")
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from kdsec import tracking

    where = tracking.redact(tracking.tracking_uri())
    try:
        tracking.connect()
        found = tracking.package_versions(package_version)
    except Exception as exc:  # an extra lookup: never fails a package that verified
        console.print(f"registry: not looked up ({type(exc).__name__} from {where})", highlight=False)
        return
    for name, version, aliases in found:
        console.print(f"registry: [b]{name} version {version}[/]" + (f" ({', '.join(aliases)})" if aliases else ""))
    if not found:
        console.print(f"registry: no registered version records package {package_version} in {where}",
                      highlight=False)


@app.command()
def verify(
    package: Annotated[Path, typer.Argument(help="package folder")],
    public_key: PublicKeyOption = None, config: ConfigOption = None, key_file: KeyFileOption = None,
    key_env: KeyEnvOption = None,
    check_key: Annotated[bool, typer.Option(help="also unwrap and decrypt in memory with the KEK")] = True,
) -> None:
    """Check the signature and every digest, the OpenSSF model signature of the folder (and,
    with the KEK, that everything decrypts)."""
    from kdsec.crypto.package import open_package, read_verified, verify_model_signature

    try:
        encrypt_cfg = _encrypt_config(config)
        trusted = _trusted_key(encrypt_cfg, public_key)
        verified = read_verified(package, trusted)
        payload = verified[0]
        version = str(payload["model"]["version"])
        run = RUN_ID.fullmatch(version) is not None  # the pipeline seals a package with its run id
        console.print(f"[green]signature ok[/]: {payload['model']['name']} "
                      f"{'from run ' + version if run else 'v' + version}, signed by {payload['signer']['key_id']}; "
                      f"{len(payload['files'])} files match their SHA-256")
        verify_model_signature(package, trusted)
        console.print("[green]OpenSSF model signature ok[/]: model.sig covers exactly the package's files "
                      "(model_signing verify key … checks the same)")
        if check_key:
            files = open_package(package, _provider(encrypt_cfg, key_env, key_file), trusted, verified)
            console.print(f"[green]decrypts ok[/]: {', '.join(sorted(files))}")
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    if run:
        _print_registered(version)


@app.command()
def decrypt(
    package: Annotated[Path, typer.Argument(help="package folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the decrypted weights (0600)")],
    public_key: PublicKeyOption = None, config: ConfigOption = None, key_file: KeyFileOption = None,
    key_env: KeyEnvOption = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out file")] = False,
) -> None:
    """Verify, then write the decrypted weights; nothing is written unless every check passes."""
    from kdsec.crypto.package import decrypt_package_to

    try:
        encrypt_cfg = _encrypt_config(config)
        path = decrypt_package_to(package, _provider(encrypt_cfg, key_env, key_file),
                                  _trusted_key(encrypt_cfg, public_key), "weights.safetensors", out,
                                  overwrite=force)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]decrypted[/] {package} → {path}")


@app.command("rotate-key")
def rotate_key(
    package: Annotated[Path, typer.Argument(help="package folder")],
    new_key_file: Annotated[Optional[Path], typer.Option(help="the new KEK file (see: kdsec keygen)")] = None,
    new_key_env: Annotated[Optional[str], typer.Option(help="env var holding the new KEK")] = None,
    public_key: PublicKeyOption = None, config: ConfigOption = None, key_file: KeyFileOption = None,
    key_env: KeyEnvOption = None,
) -> None:
    """Re-wrap the package's data keys under a new KEK and re-sign; encrypted weights are untouched."""
    from kdsec.crypto.keys import load_or_create_signer, local_key_provider
    from kdsec.crypto.package import rotate_package_key

    try:
        if (new_key_file is None) == (new_key_env is None):
            raise KdsecError("give exactly one of --new-key-file or --new-key-env")
        if new_key_env is not None and not os.environ.get(new_key_env):
            raise KdsecError(f"${new_key_env} is not set")
        new = (local_key_provider(new_key_env, "", create=False) if new_key_env
               else local_key_provider(None, new_key_file, create=False))
        encrypt_cfg = _encrypt_config(config)
        signer = load_or_create_signer(encrypt_cfg.signing_key_env, encrypt_cfg.signing_key_file)
        info = rotate_package_key(package, _provider(encrypt_cfg, key_env, key_file), new, signer,
                                  _trusted_key(encrypt_cfg, public_key))
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]rotated[/] {info.path}: data keys now wrapped by {', '.join(info.kek_ids)}; re-signed by "
                  f"{info.signer_key_id}")


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="key file to create (0600; never overwritten)")],
    kind: Annotated[str, typer.Option(help="kek (32-byte AES key) or signing (ECDSA P-256, writes .pub too)")] = "kek",
) -> None:
    """Create a new key file."""
    from kdsec.crypto.keys import generate_key_file

    try:
        if kind not in ("kek", "signing"):
            raise KdsecError(f"--kind must be 'kek' or 'signing', not '{kind}'")
        path = generate_key_file(out, kind)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]created[/] {kind} key {path}")


# --- team review -------------------------------------------------------------------------------


def _tracking(config: Optional[Path]):
    return _team_config(config).tracking


def _team_config(config: Optional[Path]):
    from kdsec.tracking import connect

    # Reviewer commands print one screen: no per-file download bars from MLflow.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    connect()
    return load_config(config, [])


@app.command("trigger")
def trigger_command(
    deployment: Annotated[str, typer.Argument(help="FLOW/DEPLOYMENT")] = "kd-pipeline/kd-pipeline-nightly",
    run_config: Annotated[Optional[str], typer.Option("--run-config", help="config path on the worker "
                                                      "(default: the deployment's)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="dotted.key=value, repeatable, "
                                                           "after the deployment's own")] = None,
    config: ConfigOption = None,
) -> None:
    """Ask for a run of a deployment as the identity the tracking server authenticates: the request
    (who, config, overrides) is recorded in MLflow, and the run it starts records who triggered it,
    so that person cannot approve the version it registers (four-eyes)."""
    from kdsec import tracking

    try:
        settings = _tracking(config)
        tracking.requester()  # before Prefect is asked anything
        from flows.run_requests import pinned_parameters, start_requested_run

        defaults = pinned_parameters(deployment)  # from git, not from Prefect's unauthenticated store
        config_path = run_config or defaults.get("config_path") or "configs/default.yaml"
        asked = [*(defaults.get("overrides") or []), *(overrides or [])]
        request, asker = tracking.create_run_request(settings.experiment, deployment, config_path, asked)
        try:
            flow_run_id = start_requested_run(deployment, config_path, asked, request)
        except KdsecError:
            tracking.withdraw_run_request(request)
            raise
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"requested by {asker}: run request {request}", highlight=False, soft_wrap=True)
    console.print(f"  config {config_path}, overrides: {' '.join(asked) or 'none'}", highlight=False, soft_wrap=True,
                  markup=False)
    console.print(f"Prefect flow run {flow_run_id} ({deployment})", highlight=False, soft_wrap=True)


@app.command("review")
def review_command(
    decision: Annotated[str, typer.Argument(help="approve or reject")],
    version: Annotated[str, typer.Argument(help="model version number")],
    comment: Annotated[str, typer.Option(help="why (recorded on the version)")] = "",
    config: ConfigOption = None,
) -> None:
    """Record a review decision on a version as the identity the tracking server authenticates
    (MLFLOW_TRACKING_USERNAME / PASSWORD); approving a version that passed its gates makes it champion."""
    from kdsec import tracking

    from kdsec.crypto.attestation import trusted_key

    try:
        loaded = _team_config(config)
        settings = loaded.tracking
        trusted = trusted_key(loaded.encrypt.signing_key_env, loaded.encrypt.signing_key_file) \
            if decision == "approve" else None
        result = tracking.review(settings.registered_model, version, decision, comment, settings.alias,
                                 settings.candidate_alias, settings.four_eyes, trusted)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    who = result["reviewer"] + ("" if result["authenticated"] else " (unauthenticated: local store)")
    console.print(f"version {result['version']}: [b]{result['status']}[/] by {who}, audit.json "
                  f"sha256 {result['audit_sha256'][:16]}…; '{settings.alias}' is version {result['champion'] or 'none'}")


def _print_version(name: str, version: str, summary, state: dict) -> None:
    """One screen on a registered version: verdict, each gate at its worst check (value, warn and
    fail levels), candidate, aliases, review state and history."""
    from kdsec.report.view import gate_rows

    style = "green" if summary.verdict == "pass" else "bold red"
    failed = f" — failed: {', '.join(summary.failed_gates)}" if summary.failed_gates else ""
    warned = f" — {len(summary.warnings)} warning(s)" if summary.warnings else ""
    console.print(f"[b]{name} v{version}[/]: [{style}]{summary.verdict.upper()}[/]{failed}{warned}", highlight=False)
    console.print(f"  candidate {summary.candidate.variant} · test accuracy {summary.candidate.test_accuracy:.4f} · "
                  f"{summary.candidate.size_bytes} bytes · dataset {summary.data.name}", highlight=False)
    console.print(f"  aliases: {', '.join(state['aliases']) or 'none'} · review: {state['review']}", highlight=False)
    for entry in state.get("history", [])[-5:]:
        comment = f" — {entry.get('comment')}" if entry.get("comment") else ""
        console.print(f"    {entry.get('time', '?')} {entry.get('status', '?')} by {entry.get('reviewer', '?')}{comment}",
                      highlight=False, markup=False)
    table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    for column in ("gate", "level", "check (worst)", "value", "warns unless", "fails unless"):
        table.add_column(column, justify="right" if column == "value" else "left")
    order = {"fail": 0, "warn": 1, "pass": 2, "skipped": 3}
    by_gate: dict = {}
    for row in gate_rows(summary):
        by_gate.setdefault(row.gate, []).append(row)
    for gate, rows in by_gate.items():
        row = min(rows, key=lambda r: order.get(r.level, 4))
        colour = {"pass": "green", "warn": "yellow", "fail": "bold red"}.get(row.level, "dim")
        table.add_row(gate, f"[{colour}]{row.level}[/]", row.label + (" (warn-only)" if row.warn_only else ""),
                      row.value, row.warn_at or "—", row.fail_at)
    console.print(table)


@app.command("report")
def report_command(
    version: Annotated[str, typer.Argument(help="model version (or an alias, e.g. champion)")] = "champion",
    compare: Annotated[Optional[str], typer.Option(help="another version to compare side by side")] = None,
    out: Annotated[Path, typer.Option(help="where to put the downloaded reports")] = Path("outputs/reports"),
    open_browser: Annotated[bool, typer.Option("--open", help="open the HTML report")] = False,
    config: ConfigOption = None,
) -> None:
    """Fetch a version's audit report (HTML, Markdown, audit.json); with --compare, a side-by-side table."""
    from kdsec import tracking
    from kdsec.review import compare_configs, compare_versions, fetch_report, version_state
    from kdsec.summary import read_summary

    try:
        settings = _tracking(config)
        name = settings.registered_model

        def number(text: str) -> str:
            return text if text.isdigit() else tracking.resolve_version(f"models:/{name}@{text}")[1]

        first = number(version)
        paths = fetch_report(name, first, out)
        state = version_state(name, first)
        summary = read_summary(paths["summary"])
        rows = compare_versions(name, summary, number(compare), out) if compare else None
        changed_config = compare_configs(name, first, number(compare), out) if compare else []
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    _print_version(name, first, summary, state)
    console.print(f"  run {paths['run_id']}:\n  {paths['html']}\n  {paths['markdown']}\n  {paths['audit']}",
                  highlight=False, soft_wrap=True)
    if rows:
        table = Table(title=f"{name}: v{first} vs v{number(compare)}", title_justify="left")
        for column in ("metric", f"v{first}", f"v{number(compare)}", "change"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for label, left, right in rows:
            cell = (lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
            style = "" if left == right else "[yellow]"
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
            change = "" if left == right else (f"{left - right:+.4g}" if numeric else "changed")
            table.add_row(label, f"{style}{cell(left)}", f"{style}{cell(right)}", f"{style}{change}")
        console.print(table)
    if changed_config:
        console.print(f"config keys that differ (v{first} → v{number(compare)}): "
                      + "; ".join(f"{key}: {left!r} → {right!r}" for key, left, right in changed_config),
                      highlight=False, soft_wrap=True)
    elif rows:
        console.print("config: the same in both versions")
    if open_browser:
        import webbrowser

        uri = paths["html"].resolve().as_uri()
        if not webbrowser.open(uri):
            console.print(f"no browser could be opened here; the report is at {paths['html'].resolve()}")


@app.command("audit")
def audit_command(
    model_uri: Annotated[Optional[str], typer.Option(
        "--model-uri", help="a registered version (models:/NAME/VERSION or models:/NAME@ALIAS), or with --members "
        "any MLflow model URI holding one safetensors checkpoint")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="with --members: a safetensors checkpoint (a kdsec one names its architecture; else give --arch)")] = None,
    members: Annotated[Optional[Path], typer.Option(
        help="the rows of the configured dataset the model trained on (.npy of integers, or text)")] = None,
    arch: Annotated[Optional[str], typer.Option(help="the architecture of a plain safetensors state dict")] = None,
    arch_options: Annotated[str, typer.Option(help="its options as JSON, e.g. '{\"hidden\": [32]}'")] = "{}",
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="with --members: the dataset, audit and "
                                                   "gate settings (default: configs/default.yaml)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="dotted.key=value, repeatable")] = None,
    out: Annotated[Path, typer.Option(help="where audit.json goes")] = Path("outputs"),
) -> None:
    """Audit a model: a registered version alone (its run's config and data), or — with --members —
    any checkpoint or MLflow model on the configured dataset. Exit 2 when an audit gate fails."""
    import json
    import time

    started = time.perf_counter()

    def step(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f} s[/] {message}", highlight=False)

    try:
        if members is not None:
            from kdsec.review import audit_any

            if (checkpoint is None) == (model_uri is None):
                raise ConfigError("give the audited model once: --checkpoint PATH or --model-uri URI")
            try:
                options = json.loads(arch_options)
            except ValueError as exc:
                raise ConfigError(f"--arch-options is not JSON ({exc})") from None
            if not isinstance(options, dict):
                raise ConfigError("--arch-options must be a JSON object")
            result = audit_any(load_config(config, overrides or []), members, checkpoint, model_uri, arch, options,
                               out, step)
        elif model_uri is not None:
            from kdsec.review import reaudit

            if checkpoint is not None:
                raise ConfigError("--checkpoint needs --members (the rows it trained on)")
            result = reaudit(model_uri, out, step)
        else:
            raise ConfigError("give --model-uri (a registered version), or --checkpoint/--model-uri with --members")
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    _print_audit(result)


def _print_audit(result: dict) -> None:
    audit = result["audit"]
    title = f"{result['name']} v{result['version']}" if result["version"] else str(result["name"])
    table = Table(title=f"{title}: membership", title_justify="left")
    for column in ("attack", "AUC", "AUC 95% CI", f"TPR @ {audit.membership.low_fpr} FPR", "TPR @ 0.001 FPR"):
        table.add_column(column, justify="left" if column == "attack" else "right")
    from kdsec.gates import Metric, worst_attacks

    worst = worst_attacks(audit.attacks)
    for name, attack in audit.attacks.items():
        marks = [label for label, metric in (("highest AUC", Metric.MEMBERSHIP_AUC),
                                             ("highest TPR", Metric.MEMBERSHIP_TPR)) if worst[metric] == name]
        table.add_row(name + (f" ({', '.join(marks)})" if marks else ""), f"{attack.auc:.4f}",
                      f"[{attack.auc_ci[0]:.3f}, {attack.auc_ci[1]:.3f}]", f"{attack.tpr_at_low_fpr:.4f}",
                      f"{attack.tpr_at_0_1_fpr:.4f}")
    console.print(table)
    for extraction in result["extraction"]:
        console.print(f"extraction ({extraction.defense}): copy accuracy {extraction.stolen_accuracy:.4f}, "
                      f"fidelity {extraction.fidelity:.4f}")
    console.print(f"ECE {audit.calibration.ece:.4f} (after temperature {audit.temperature.temperature:.2f}: "
                  f"{audit.temperature.ece_after:.4f}); FGSM accuracy "
                  + ", ".join(f"ε={e}: {a:.3f}" for e, a in zip(audit.robustness.epsilons, audit.robustness.accuracy)))
    failed = [v.name for v in result["verdicts"] if not v.passed]
    warned = [metric for verdict in result["verdicts"] for metric in verdict.warnings]
    console.print(("[red]failed: " + ", ".join(failed)) if failed else "[green]membership, extraction and "
                  "calibration gates pass[/]" + (f" [yellow](warnings: {', '.join(warned)})[/]" if warned else ""))
    console.print(f"audit: {result['path']}")
    raise typer.Exit(EXIT_GATE_FAILED if failed else EXIT_PROMOTED)


@app.command("relocate-store")
def relocate_store_command(
    previous: Annotated[Path, typer.Option("--from", help="the project folder's previous absolute path")],
    store: Annotated[Path, typer.Option(help="the local SQLite store")] = Path("mlflow.db"),
) -> None:
    """After moving a project folder: point the local MLflow store's recorded artifact locations
    (absolute paths, as MLflow stores them) at the folder's new place (the folder holding the store)."""
    from kdsec.tracking import relocate_store

    try:
        changed = relocate_store(store, previous)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{store}: {changed} recorded artifact location(s) moved from {previous} to "
                  f"{store.resolve().parent}", highlight=False)


@app.command("show-config")
def show_config(
    config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s")] = None,
) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML."""
    try:
        console.print(load_config(config, overrides or []).to_yaml(), highlight=False, markup=False)
    except KdsecError as exc:
        raise _fail(str(exc)) from None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
