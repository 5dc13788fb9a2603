"""The team stack's HE host: ``kdsec he-serve`` on the registry's champion (its weights file only,
its query budget from the champion's extraction audit), for the clients of ``KDSEC_HE_CLIENTS``.

Their tokens are provisioned like the MLflow users' passwords: made once by kdsec's token store
(``.stack/he_tokens.json``, hashes only, which the host re-reads on change), each handed over in
``.stack/users/<client>.he.env`` (0600: ``KDSEC_HE_URL``, ``KDSEC_HE_TOKEN``). A client whose token
was revoked (``kdsec he-token revoke <id> --store .stack/he_tokens.json``) gets a new one at the
next ``up``. The host needs a champion: ``up`` starts it once one exists, ``he-up`` after the first
approval. Imported by ``stack.py`` (and imports it back lazily: one stack, one set of helpers).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def clients(config: dict[str, str]) -> list[str]:
    return [name.strip() for name in config.get("KDSEC_HE_CLIENTS", "").split(",") if name.strip()]


def token_store() -> Path:
    import stack

    return stack.state_dir() / "he_tokens.json"


def url(config: dict[str, str]) -> str:
    return f"http://127.0.0.1:{config['KDSEC_HE_PORT']}"


def _client_file(client: str) -> Path:
    import stack

    return stack.state_dir() / "users" / f"{client}.he.env"


def _written_token(path: Path) -> str | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("export KDSEC_HE_TOKEN="):
            return line.split("=", 1)[1].strip()
    return None


def provision_tokens(config: dict[str, str]) -> list[str]:
    """A live token for every client (kept if still active for this host, else made anew) and its
    0600 env file; the clients who got a new one."""
    from kdsec.he.tokens import TOKEN, TokenStore

    store, host_id = TokenStore(token_store()), config["KDSEC_HE_HOST_ID"]
    records = {record.id: record for record in store.read().tokens}
    made = []
    for client in clients(config):
        path = _client_file(client)
        match = TOKEN.fullmatch(_written_token(path) or "")
        record = records.get(match.group(1)) if match else None
        if (record is not None and record.revoked is None and record.host == host_id and record.client == client
                and (record.expires is None or record.expires > time.time())):
            continue
        token, _ = store.create(client, host_id)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(descriptor, 0o600)  # O_TRUNC keeps an existing file's mode
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"export KDSEC_HE_URL={url(config)}\nexport KDSEC_HE_TOKEN={token}\n")
        made.append(client)
    return made


def he_up(config: dict[str, str], secret: dict[str, str], timeout: float = 120.0) -> None:
    """Provision the tokens and start the host on the champion, as the pipeline's MLflow user
    (it reads the registry); StackError with the host's own line when it cannot start."""
    import stack

    provision_tokens(config)
    if stack.running("he-host") is not None:
        return
    user = config["KDSEC_PIPELINE_USER"]
    env = {**stack.base_env(), "MLFLOW_TRACKING_URI": stack.urls(config)["mlflow"],
           "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": secret[stack.password_key(user)]}
    log = stack.state_dir() / "logs" / "he-host.log"
    before = log.stat().st_size if log.is_file() else 0
    stack.spawn("he-host", [str(stack.BIN / "kdsec"), "he-serve", "--model-uri",
                            f"models:/{config['KDSEC_REGISTERED_MODEL']}@champion", "--token-file", str(token_store()),
                            "--host-id", config["KDSEC_HE_HOST_ID"], "--port", config["KDSEC_HE_PORT"]],
                env, "he-serve")
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_bytes()[before:].decode(errors="replace") if log.is_file() else ""
        if "listening on" in text:
            return
        if stack.running("he-host") is None:
            reason = next((line for line in text.splitlines() if line.startswith("error:")), stack._tail("he-host"))
            raise stack.StackError(f"the HE host did not start: {reason.removeprefix('error: ')[:300]}")
        if time.monotonic() > deadline:
            raise stack.StackError(f"the HE host did not start within {timeout:.0f} s; see {log}")
        time.sleep(0.3)
