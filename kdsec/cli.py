"""The ``kdsec`` command.

``kdsec run`` exits 0 when the candidate was promoted, 2 when the run completed but a gate
failed (nothing promoted), 1 on any error (one line on stderr).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdsec.config import load_config
from kdsec.errors import KdsecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil, compress, encrypt and audit a student model; promote it only through gates.")
console = Console()
err = Console(stderr=True)

EXIT_PROMOTED, EXIT_ERROR, EXIT_GATE_FAILED = 0, 1, 2


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_ERROR)


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: configs/default.yaml)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="dotted.key=value, repeatable")] = None,
) -> None:
    """Run the kd-pipeline flow: data → teacher → KD student → compress → encrypt → audit → gates → registry."""
    from kdsec.stages import preflight

    try:
        resolved = load_config(config, overrides or [])
        preflight(resolved)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    # kdsec logs epoch progress through the "kdsec" logger; let Prefect show it with its own.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "kdsec")
    # The first start of the temporary Prefect server migrates its database; on a busy 2-core
    # machine that can exceed Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    logging.getLogger("kdsec").setLevel(logging.INFO)
    # The CLI is the one place in kdsec that reaches the orchestration layer, lazily, so that
    # importing the library never imports Prefect.
    from flows.kd_pipeline import kd_pipeline

    try:
        summary = kd_pipeline(config=resolved.model_dump(mode="json"))
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the last line a user sees must say what broke
        raise _fail(f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    _print_summary(summary)
    raise typer.Exit(EXIT_PROMOTED if summary["promoted"] else EXIT_GATE_FAILED)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"kd-pipeline — {summary['verdict'].upper()}", title_justify="left")
    for column in ("gate", "verdict", "metric", "value", "threshold"):
        table.add_column(column, justify="left" if column in ("gate", "metric") else "right")
    for name, gate in summary["gates"].items():
        for check in gate["checks"]:
            value = "missing" if check["value"] is None else f"{check['value']:.4f}"
            level = check.get("level", "pass" if check["passed"] else "fail")
            style = {"pass": "green", "warn": "yellow", "fail": "bold red"}.get(level, "dim")
            table.add_row(name, f"[{style}]{level}[/]", check["metric"], value,
                          f"{check['direction']} {check['threshold']:.4f}")
    console.print(table)
    models = summary["models"]
    console.print(
        f"accuracy: teacher {models['teacher']['test_accuracy']:.4f} · scratch student "
        f"{models['scratch_student']['test_accuracy']:.4f} · KD student {models['kd_student']['test_accuracy']:.4f}"
        f" · candidate [b]{summary['candidate']['variant']}[/] {summary['candidate']['test_accuracy']:.4f}"
        f" (teacher cache: {summary['teacher_cache']})")
    candidate_audit = summary["audit"]["candidate"]["membership"]
    console.print(f"audit: strongest membership attack on the candidate: {candidate_audit['attack']} "
                  f"(AUC {candidate_audit['auc']:.3f}, TPR {candidate_audit['tpr_at_low_fpr']:.3f} at "
                  f"{candidate_audit['low_fpr']} FPR); {summary['audit_timing']['seconds']:.1f} s, "
                  f"{summary['audit_timing']['ratio_to_teacher_training']:.2f}× teacher training")
    for result in summary.get("extraction", []):
        console.print(f"extraction ({result['defense']}): copy accuracy {result['stolen_accuracy']:.4f}, "
                      f"fidelity {result['fidelity']:.4f}")
    he = summary["he"]
    for run in he["runs"]:
        console.print(f"HE {run['mode']} ({run['path']}): agreement {run['agreement']:.4f}, "
                      f"{run['ms_per_sample']:.2f} ms/sample on {run['samples']} samples")
    registry = summary["registry"]
    if summary["promoted"]:
        console.print(f"[green]promoted[/]: {registry['model']} version {registry['version']} is now "
                      f"'{registry['alias']}'")
    else:
        console.print(f"[red]not promoted[/]: gate(s) failed: {', '.join(summary['failed_gates'])}; "
                      f"'{registry['alias']}' stays at version {registry['previous_champion'] or 'none'} "
                      f"(this run is version {registry['version']}, tagged gates=fail)")
    console.print(f"report:  {summary['report']['html']}\n         {summary['report']['markdown']}")
    console.print(f"summary: {summary['summary_path']}")


# --- protected packages -------------------------------------------------------------------------

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="config whose encrypt.* keys to use")]
KeyFileOption = Annotated[Optional[Path], typer.Option("--key-file", help="KEK file (default: encrypt.key_file)")]
KeyEnvOption = Annotated[Optional[str], typer.Option("--key-env", help="env var holding the KEK (default: encrypt.key_env)")]
PublicKeyOption = Annotated[Optional[Path], typer.Option(
    "--public-key", help="trusted Ed25519 public key (PEM); default: the .pub of encrypt.signing_key_file")]


def _encrypt_config(config: Optional[Path]):
    return load_config(config, []).encrypt


def _provider(config: Optional[Path], key_env: Optional[str], key_file: Optional[Path], create: bool = False):
    from kdsec.crypto.keys import local_key_provider

    encrypt = _encrypt_config(config)
    # An explicit --key-file wins over the configured env var; an explicit --key-env over both.
    env = key_env if key_env is not None else (None if key_file is not None else encrypt.key_env)
    return local_key_provider(env, key_file or encrypt.key_file, create=create)


def _trusted_key(config: Optional[Path], public_key: Optional[Path]):
    from kdsec.crypto.keys import load_or_create_signer, load_public_key, public_key_path

    if public_key is not None:
        return load_public_key(public_key)
    encrypt = _encrypt_config(config)
    if os.environ.get(encrypt.signing_key_env):
        return load_or_create_signer(encrypt.signing_key_env, encrypt.signing_key_file).public
    pub = public_key_path(Path(encrypt.signing_key_file))
    if pub.exists():
        return load_public_key(pub)
    raise KdsecError(f"no trusted public key: pass --public-key PATH (the signer's .pub), or set "
                     f"${encrypt.signing_key_env} / create {encrypt.signing_key_file}")


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
        encrypt_cfg = load_config(config, [])
        if not checkpoint.is_file():
            raise KdsecError(f"checkpoint '{checkpoint}' not found")
        _, spec, weight_format = load_weights(checkpoint)  # refuse anything that is not a kdsec checkpoint
        provider = _provider(config, key_env, key_file, create=True)
        signer = load_or_create_signer(encrypt_cfg.encrypt.signing_key_env, encrypt_cfg.encrypt.signing_key_file)
        card = {"format": weight_format, "spec": json_module.loads(spec.to_json()), "source": checkpoint.name}
        info = create_package(out, {"weights.safetensors": checkpoint.read_bytes()},
                              {"model.json": json_module.dumps(card, indent=2, sort_keys=True).encode()},
                              name=name or encrypt_cfg.tracking.registered_model, version=version,
                              provider=provider, signer=signer)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]sealed[/] {checkpoint} → {info.path} (model {info.model} v{info.version}, "
                  f"KEK {', '.join(info.kek_ids)}, signer {info.signer_key_id})")


@app.command()
def verify(
    package: Annotated[Path, typer.Argument(help="package folder")],
    public_key: PublicKeyOption = None, config: ConfigOption = None, key_file: KeyFileOption = None,
    key_env: KeyEnvOption = None,
    check_key: Annotated[bool, typer.Option(help="also unwrap and decrypt in memory with the KEK")] = True,
) -> None:
    """Check the signature and every digest (and, with the KEK, that everything decrypts)."""
    from kdsec.crypto.package import open_package, verify_package

    try:
        trusted = _trusted_key(config, public_key)
        payload = verify_package(package, trusted)
        console.print(f"[green]signature ok[/]: {payload['model']['name']} v{payload['model']['version']}, "
                      f"signed by {payload['signer']['key_id']}; {len(payload['files'])} files match their SHA-256")
        if check_key:
            files = open_package(package, _provider(config, key_env, key_file), trusted)
            console.print(f"[green]decrypts ok[/]: {', '.join(sorted(files))}")
    except KdsecError as exc:
        raise _fail(str(exc)) from None


@app.command()
def decrypt(
    package: Annotated[Path, typer.Argument(help="package folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the decrypted weights (0600)")],
    public_key: PublicKeyOption = None, config: ConfigOption = None, key_file: KeyFileOption = None,
    key_env: KeyEnvOption = None,
) -> None:
    """Verify, then write the decrypted weights; nothing is written unless every check passes."""
    from kdsec.crypto.package import decrypt_package_to

    try:
        path = decrypt_package_to(package, _provider(config, key_env, key_file), _trusted_key(config, public_key),
                                  "weights.safetensors", out)
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
        info = rotate_package_key(package, _provider(config, key_env, key_file), new, signer,
                                  _trusted_key(config, public_key))
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]rotated[/] {info.path}: data keys now wrapped by {', '.join(info.kek_ids)}; re-signed by "
                  f"{info.signer_key_id}")


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="key file to create (0600; never overwritten)")],
    kind: Annotated[str, typer.Option(help="kek (32-byte AES key) or signing (Ed25519, writes .pub too)")] = "kek",
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
