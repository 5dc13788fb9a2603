"""``HEHttpClient``: the key holder's side of the HE host's HTTP API."""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from kdsec.config import HEConfig
from kdsec.errors import KdsecError
from kdsec.he import DiagonalPlan, GatherPlan, GridPlan
from kdsec.he.gather import GATHER_INPUT_BITS, GATHER_WEIGHT_SCALE_BITS
from kdsec.he.params import plan_paired, plan_params
from kdsec.he.program import batched_params
from kdsec.he.seal import KeyHolder


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a 3xx is answered as the error it is
        return None


class HEHttpClient:
    """The key holder's side: fetch the plan, send a public context, encrypt, post, decrypt.

    Thread-safe: a lock serializes its calls (the host evaluates one request per session at a
    time anyway). For parallel inference give each thread its own client, hence its own keys
    and session::

        def worker(batch):
            with HEHttpClient(url) as client:
                return client.predict_logits(batch)

    ``close()`` (or leaving the ``with`` block) ends the host's session and frees its memory. A
    503 (host busy or full) is retried after its Retry-After while that fits in ``busy_wait`` seconds.

    ``token`` (default: the ``KDSEC_HE_TOKEN`` variable) is the client's bearer token. An
    ``https://`` host is verified against ``cafile`` (or the system's CAs) and its hostname; the
    token is never sent over plain HTTP to anything but a loopback address.
    """

    def __init__(self, url: str, config: HEConfig = HEConfig(), path: str = "batched",
                 busy_wait: float = 30.0, token: str | None = None, cafile: str | None = None) -> None:
        self.url, self.path, self.busy_wait = url.rstrip("/"), path, busy_wait
        self.token = token if token is not None else os.environ.get("KDSEC_HE_TOKEN") or None
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KdsecError(f"HE host URL must be http(s)://host:port, got '{url[:200]}'")
        if self.token and parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise KdsecError(f"refusing to send a token to {parts.hostname} over plain HTTP: use https://")
        tls = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
        # No redirects: urllib would carry the Authorization header to wherever a 3xx points.
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=tls))
        self._lock = threading.Lock()
        self.plan = json.loads(self._request("GET", "/plan"))
        self.client: str | None = None
        if self.plan.get("auth") == "bearer" or self.token:
            if not self.token:
                raise KdsecError("this host requires a client token: pass token= or set KDSEC_HE_TOKEN "
                                 "(kdsec he-token create makes one)")
            self.client = json.loads(self._request("GET", "/whoami"))["client"]  # before any large upload
        step = self.plan[path]
        if "paired" not in step.get("chains", ["classic"]):  # an older host, or a program that does not alternate
            config = config.model_copy(update={"batched_chain": "classic"})
        if path == "batched":
            params = batched_params(self.plan["structure"], config)
        elif step.get("layout") == "gather":  # its paired chain, on the ring the host laid it out for
            ring = GatherPlan.from_dict(step, self.plan["structure"][0][2]).ring_slots * 2  # checked first
            params = plan_paired(len(self.plan["structure"]) // 2, GATHER_WEIGHT_SCALE_BITS, config.integer_bits,
                                 ring, GATHER_INPUT_BITS)
            if params is None:
                raise KdsecError(f"no paired chain fits the host's gather layout on {step['ring_slots']} slots")
        else:
            params = plan_params(step["depth"], config.scale_bits, config.integer_bits, config.poly_modulus_degree,
                                 step["min_slots"])
        self.holder = KeyHolder(params, tuple(step["rotation_steps"]))
        self.session: str | None = json.loads(
            self._request("POST", "/sessions", self.holder.public_context()))["session"]

    def __enter__(self) -> HEHttpClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the host's session (idempotent)."""
        with self._lock:
            if self.session is not None:
                session, self.session = self.session, None
                self._request("DELETE", f"/sessions/{session}")

    def _request(self, method: str, route: str, body: bytes | None = None) -> bytes:
        give_up = time.monotonic() + self.busy_wait
        while True:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            request = urllib.request.Request(self.url + route, data=body, method=method, headers=headers)
            try:
                with self._opener.open(request, timeout=300) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                retry = exc.headers.get("Retry-After", "")
                wait = int(retry) if retry.isdigit() else None
                if exc.code in (429, 503) and wait is not None and time.monotonic() + wait <= give_up:
                    time.sleep(wait)
                    continue
                try:
                    reason = str(json.loads(exc.read())["error"])
                except (ValueError, KeyError, TypeError):
                    reason = str(exc.reason)
                hint = f"; retry after {retry} s" if retry else ""
                raise KdsecError(f"HE host refused {method} {route.split('?')[0]} ({exc.code}): "
                                 f"{reason}{hint}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise KdsecError(f"cannot reach the HE host at {self.url}: {getattr(exc, 'reason', exc)}") from None

    def predict_logits(self, inputs: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.session is None:
                raise KdsecError("this HE client is closed: create a new one")
            features = inputs.reshape(len(inputs), -1).astype(np.float64)
            if self.path == "batched":
                if len(features) > self.holder.params.slots:
                    raise ValueError(f"{len(features)} samples exceed {self.holder.params.slots} slots")
                reply = self._infer([features[:, index] for index in self.plan["batched"]["required_inputs"]])
                return np.stack([self.holder.decrypt(ct)[: len(features)] for ct in reply], axis=1)
            single = self.plan["single"]
            layout = single.get("layout", "grid")
            encode = (GridPlan(single["rows"], single["cols"], tuple(single["rotation_steps"])).encode_input
                      if layout == "grid" else GatherPlan.from_dict(single, self.plan["structure"][0][2]).encode_input
                      if layout == "gather"
                      else DiagonalPlan.encode_input)
            rows = []
            for sample in features:
                (reply,) = self._infer(list(np.atleast_2d(encode(sample))))
                rows.append(self.holder.decrypt(reply)[single["output_slots"]])
            return np.stack(rows)

    def _infer(self, rows: list) -> list:
        """Encrypt ``rows`` (seeded ciphertexts: half the upload), send them, load the reply."""
        body = self.holder.encrypt_bundle(rows)
        return self.holder.public.load_ciphertexts(
            self._request("POST", f"/infer/{self.session}?path={self.path}", body))


