"""``kdsec he-token``: the client tokens of an HE host (``kdsec.he.tokens``); ``kdsec he-serve``: the
HE host for a registered version.

    kdsec he-token create --client alice [--host-id he-host] [--days 90]   prints the token once
    kdsec he-token list                                                    ids, clients, hosts, states
    kdsec he-token revoke <id>                                             refused from the next request on
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdsec.errors import KdsecError

DEFAULT_STORE = Path(".kdsec/he_tokens.json")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Client tokens of an HE host: create (shown once), list, revoke. Stored as hashes.")
console = Console()
err = Console(stderr=True)
Store = Annotated[Path, typer.Option("--store", help="the token store the host reads (--token-file)")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.command()
def create(
    client: Annotated[str, typer.Option("--client", help="who the token is for (in refusals and quotas)")],
    host_id: Annotated[str, typer.Option("--host-id", help="the host it is for (the host's --host-id)")] = "he-host",
    days: Annotated[Optional[float], typer.Option("--days", help="valid this many days (default: until revoked)")] = None,
    store: Store = DEFAULT_STORE,
) -> None:
    """Make a token; it is printed once, on stdout, and only its hash is stored."""
    from kdsec.he.tokens import TokenStore

    try:
        token, record = TokenStore(store).create(client, host_id, days)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    err.print(f"token {record.id} for client '{record.client}' on host '{record.host}'"
              f"{'' if record.expires is None else f', expires in {days:g} days'}; shown once:", highlight=False)
    print(token)


@app.command("list")
def list_tokens(store: Store = DEFAULT_STORE) -> None:
    """Every token: id, client, host, created, and whether it is active, expired or revoked."""
    from kdsec.he.tokens import TokenStore

    try:
        tokens = TokenStore(store).read().tokens
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"HE host tokens in {store}")
    for column in ("id", "client", "host", "created", "state"):
        table.add_column(column)
    now = time.time()
    for record in tokens:
        state = ("revoked" if record.revoked is not None else "expired" if record.expires and record.expires <= now
                 else "active")
        table.add_row(record.id, record.client, record.host,
                      time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created)), state)
    console.print(table)


@app.command()
def revoke(token_id: Annotated[str, typer.Argument(help="the token's id (kdsec he-token list)")],
           store: Store = DEFAULT_STORE) -> None:
    """Revoke a token: the host refuses it (403) from its next request on."""
    from kdsec.he.tokens import TokenStore

    try:
        record = TokenStore(store).revoke(token_id)
    except KdsecError as exc:
        raise _fail(str(exc)) from None
    console.print(f"token {record.id} (client '{record.client}') revoked", highlight=False)


def serve(
    model_uri: Annotated[str, typer.Option("--model-uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    tokens: Annotated[Optional[Path], typer.Option("--token-file", help="the token store (kdsec he-token create)")] = None,
    host_id: Annotated[str, typer.Option("--host-id", help="this host's name, as its tokens name it")] = "he-host",
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0 picks a free port")] = 8765,
    query_budget: Annotated[Optional[int], typer.Option(
        "--query-budget", help="samples per client per window (default: the version's extraction audit)")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate chain: serve HTTPS")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="its PEM private key")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve anyone, as one client (loopback tests)")] = False,
) -> None:
    """Serve a registered version's encrypted-input inference (the HE host): its weights file only
    (nothing of the registered model runs), its query budget from the version's extraction audit.
    Other bounds: python -m kdsec.he.server --help."""
    import tempfile

    from kdsec import tracking
    from kdsec.he import server

    tracking.connect()
    with tempfile.TemporaryDirectory(prefix="kdsec-he-serve-") as scratch:
        try:
            name, version = tracking.resolve_version(model_uri)
            checkpoint = tracking.download_version_checkpoint(name, version, Path(scratch))
            argv = ["--model", str(checkpoint), "--host-id", host_id, "--host", host, "--port", str(port)]
            if query_budget is None:
                run_id = tracking.version_pipeline_run(name, version)
                argv += ["--audit", str(tracking.download_run_artifact(run_id, "report/audit.json",
                                                                        Path(scratch) / "report"))]
        except KdsecError as exc:
            raise _fail(str(exc)) from None
        argv += ["--query-budget", str(query_budget)] if query_budget is not None else []
        argv += ["--token-file", str(tokens)] if tokens else []
        argv += ["--no-auth"] if no_auth else []
        argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)] if tls_cert or tls_key else []
        err.print(f"serving {name} version {version} ({model_uri})", highlight=False)
        server.main(argv)
