"""Encrypted-input inference over HTTP: a host that holds the plaintext model and only public
contexts, and the client (key holder) that talks to it.

Endpoints (bodies are kdsec HE bundles, see ``kdsec.crypto.seal.pack``)::

    GET  /plan                  layer shapes, depth and rotation steps per path (no weights)
    POST /sessions              body: a public context → {"session": id}
    POST /infer/<id>?path=P     body: ciphertexts → ciphertexts (P: batched | single)

The host never receives, stores or could use a secret key: ``PublicContext.deserialize``
accepts only a public key, relinearization keys and rotation keys.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from kdsec.config import HEConfig
from kdsec.crypto.he import BatchedServer, GridPlan, SingleServer, model_structure, he_ops
from kdsec.crypto.seal import KeyHolder, PublicContext, plan_params
from kdsec.errors import KdsecError

MAX_BODY = 512 * 1024 * 1024


class HEHost:
    def __init__(self, ops) -> None:
        self.ops = ops
        grid = GridPlan.for_ops(ops)
        # Structure, depths and layouts only: nothing here reveals a weight.
        self.plan = {"structure": model_structure(ops),
                     "batched": {"depth": BatchedServer.depth(ops), "min_slots": 1, "rotation_steps": [],
                                 "required_inputs": BatchedServer.required_inputs(ops)},
                     "single": {"depth": GridPlan.depth(ops), "min_slots": grid.slots,
                                "rotation_steps": list(grid.steps), "output_slots": grid.output_slots(ops).tolist(),
                                "rows": grid.rows, "cols": grid.cols}}
        self.sessions: dict[str, dict[str, BatchedServer | SingleServer]] = {}
        self.lock = threading.Lock()

    def open_session(self, body: bytes) -> str:
        public = PublicContext.deserialize(body)
        session = secrets.token_hex(8)
        servers = {path: server(public, self.ops) for path, server in
                   (("batched", BatchedServer), ("single", SingleServer))
                   if public.params.depth >= self.plan[path]["depth"]}
        if not servers:
            raise KdsecError(f"this context allows depth {public.params.depth}; the model needs "
                             f"{self.plan['batched']['depth']} (batched) or {self.plan['single']['depth']} (single)")
        with self.lock:
            self.sessions[session] = servers
        return session

    def infer(self, session: str, path: str, body: bytes) -> bytes:
        servers = self.sessions.get(session)
        if servers is None:
            raise KdsecError(f"unknown session '{session}'")
        if path not in servers:
            raise KdsecError(f"this session's context is too shallow for the {path} path "
                             f"(needs depth {self.plan[path]['depth']})")
        server = servers[path]
        return server.public.dump_ciphertexts(server.infer(server.public.load_ciphertexts(body)))


def make_server(host: HEHost, port: int = 0, address: str = "127.0.0.1") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # request lines would go to stderr; keep the console quiet
            pass

        def _reply(self, status: int, body: bytes, content_type: str = "application/octet-stream") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._reply(status, json.dumps({"error": message}).encode(), "application/json")

        def do_GET(self) -> None:
            if urlparse(self.path).path == "/plan":
                self._reply(200, json.dumps(host.plan).encode(), "application/json")
            else:
                self._error(404, "not found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            if length <= 0 or length > MAX_BODY:
                return self._error(413, "missing or oversized body")
            body = self.rfile.read(length)
            url = urlparse(self.path)
            try:
                if url.path == "/sessions":
                    return self._reply(200, json.dumps({"session": host.open_session(body)}).encode(),
                                       "application/json")
                if url.path.startswith("/infer/"):
                    path = parse_qs(url.query).get("path", ["batched"])[0]
                    if path not in ("batched", "single"):
                        return self._error(400, f"unknown path '{path}'")
                    return self._reply(200, host.infer(url.path.rsplit("/", 1)[1], path, body))
            except KdsecError as exc:
                return self._error(400, str(exc))
            self._error(404, "not found")

    return ThreadingHTTPServer((address, port), Handler)


class HEHttpClient:
    """The key holder's side: fetch the plan, send a public context, encrypt, post, decrypt."""

    def __init__(self, url: str, config: HEConfig = HEConfig(), path: str = "batched") -> None:
        self.url, self.path = url.rstrip("/"), path
        self.plan = json.loads(self._request("GET", "/plan"))
        step = self.plan[path]
        params = plan_params(step["depth"], config.scale_bits, config.integer_bits, config.poly_modulus_degree,
                             step["min_slots"])
        self.holder = KeyHolder(params, tuple(step["rotation_steps"]))
        self.session = json.loads(self._request("POST", "/sessions", self.holder.public_context()))["session"]

    def _request(self, method: str, route: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + route, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise KdsecError(f"HE host refused {route}: {json.loads(exc.read()).get('error', exc.reason)}") from None

    def predict_logits(self, inputs: np.ndarray) -> np.ndarray:
        features = inputs.reshape(len(inputs), -1).astype(np.float64)
        if self.path == "batched":
            if len(features) > self.holder.params.slots:
                raise ValueError(f"{len(features)} samples exceed {self.holder.params.slots} slots")
            sent = [self.holder.encrypt(features[:, index]) for index in self.plan["batched"]["required_inputs"]]
            reply = self._infer(sent)
            return np.stack([self.holder.decrypt(ct)[: len(features)] for ct in reply], axis=1)
        single = self.plan["single"]
        grid = GridPlan(single["rows"], single["cols"], tuple(single["rotation_steps"]))
        rows = []
        for sample in features:
            (reply,) = self._infer([self.holder.encrypt(grid.encode_input(sample))])
            rows.append(self.holder.decrypt(reply)[single["output_slots"]])
        return np.stack(rows)

    def _infer(self, ciphertexts: list) -> list:
        body = self.holder.public.dump_ciphertexts(ciphertexts)
        return self.holder.public.load_ciphertexts(self._request("POST", f"/infer/{self.session}?path={self.path}", body))


def main(argv: list[str] | None = None) -> None:
    from kdsec.compress import load_weights

    parser = argparse.ArgumentParser(description="Serve encrypted-input inference for a kdsec HE student.")
    parser.add_argument("--model", required=True, type=Path, help="a kdsec checkpoint (float or int8)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        server = make_server(HEHost(he_ops(load_weights(args.model)[0])), args.port, args.host)
    except KdsecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"kdsec HE host listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
