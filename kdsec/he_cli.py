"""``kdsec he-token``: the client tokens of an HE host (``kdsec.he.tokens``).

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
Store = Annotated[Path, typer.Option("--store", help="the token store the host reads (--tokens)")]


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
