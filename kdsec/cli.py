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
            style = "green" if check["passed"] else "bold red"
            table.add_row(name, f"[{style}]{'pass' if check['passed'] else 'fail'}[/]", check["metric"], value,
                          f"{check['direction']} {check['threshold']:.4f}")
    console.print(table)
    models = summary["models"]
    console.print(
        f"accuracy: teacher {models['teacher']['test_accuracy']:.4f} · scratch student "
        f"{models['scratch_student']['test_accuracy']:.4f} · KD student {models['kd_student']['test_accuracy']:.4f}"
        f" · candidate [b]{summary['candidate']['variant']}[/] {summary['candidate']['test_accuracy']:.4f}"
        f" (teacher cache: {summary['teacher_cache']})")
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
