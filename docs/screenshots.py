"""Screenshots of what a reviewer sees, taken in a real headless Chromium: the latest run's HTML
report (top and plots) and the MLflow UI (runs list, the parent run, the registered model and its
version) served from the local store. ``make screenshots`` runs it; the pictures go to
``docs/screenshots/`` (committed, shown in the README).

    python docs/screenshots.py [--run-dir outputs/<run>] [--out docs/screenshots] [--width 1280]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        sys.exit("error: Chromium is not installed (make screenshots installs Debian's 'chromium' package)")
    return found


def shoot(url: str, target: Path, width: int, height: int, profile: Path, wait_ms: int = 8000) -> Path:
    """One screenshot of ``url`` at ``width``×``height``."""
    # --no-sandbox: Chromium's sandbox needs user namespaces these machines may not give; the pages
    # shown are the project's own report and a loopback MLflow UI.
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                    f"--window-size={width},{height}", f"--screenshot={target}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"  {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}  ({url[:90]})")
    return target


PROBE = ("<script>document.body.dataset.layout = JSON.stringify({height: document.documentElement.scrollHeight, "
         "sections: Object.fromEntries([...document.querySelectorAll('h2[id]')].map(h => [h.id, h.offsetTop]))})"
         "</script></body>")
SECTIONS = {"report-top.png": (None, 1500), "report-plots.png": ("plots", 1150),
            "report-explanations.png": ("explanations", 1900)}


def report_sections(report: Path, out: Path, width: int, profile: Path) -> None:
    """The whole report laid out once at ``width``, cut at its sections (where Chromium put them)."""
    import json
    import re

    from PIL import Image

    probe = profile / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE, 1))
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", f"--window-size={width},1000", "--dump-dom", probe.as_uri()],
                         check=True, capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'data-layout="([^"]*)"', dom)
    if not found:
        sys.exit("error: Chromium did not lay the report out")
    layout = json.loads(found.group(1).replace("&quot;", '"'))
    whole = shoot(report.as_uri(), profile / "whole.png", width, layout["height"], profile)
    with Image.open(whole) as image:
        for name, (section, height) in SECTIONS.items():
            top = 0 if section is None else layout["sections"].get(section)
            if top is None:
                continue
            top = max(0, top - 16)
            image.crop((0, top, width, min(top + height, image.height))).save(out / name)
            print(f"  {(out / name).relative_to(ROOT) if (out / name).is_relative_to(ROOT) else out / name}")


def latest_run(outputs: Path) -> Path:
    runs = sorted(path.parent for path in outputs.glob("*/report.html"))
    if not runs:
        sys.exit(f"error: no report under {outputs}/ — run `make run` first")
    return runs[-1]


def awaiting_review(outputs: Path) -> Path | None:
    """The latest run whose version waits for a reviewer (make run ARGS="--set tracking.require_approval=true")."""
    import json

    for run in sorted((path.parent for path in outputs.glob("*/summary.json")), reverse=True):
        try:
            if json.loads((run / "summary.json").read_text())["registry"].get("awaiting_review"):
                return run if (run / "report.html").is_file() else None
        except (OSError, ValueError, KeyError):
            continue
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mlflow_ui(store: Path, port: int) -> subprocess.Popen:
    """``mlflow ui`` on loopback against the local store, started (and later stopped) by PID."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                sys.exit("error: mlflow ui exited before it answered")
            time.sleep(1)
    stop(server)
    sys.exit("error: mlflow ui did not answer within 120 s")


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        server.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    from kdsec.summary import read_summary

    run_dir = (args.run_dir or latest_run(ROOT / "outputs")).resolve()
    summary = read_summary(run_dir / "summary.json")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        profile = Path(scratch)
        print(f"report of run {summary.run_id} ({summary.verdict}):")
        report_sections(run_dir / "report.html", args.out, args.width, profile)
        waiting = awaiting_review(ROOT / "outputs")
        if waiting is not None:  # the banner of the latest run that waits for a reviewer
            print(f"banner of run {waiting.name} (awaiting review):")
            whole = shoot((waiting / "report.html").as_uri(), profile / "review.png", args.width, 560, profile)
            shutil.copyfile(whole, args.out / "report-awaiting-review.png")
        store = ROOT / "mlflow.db"
        if not store.is_file():
            sys.exit("error: no local store (mlflow.db) to show")
        port = free_port()
        server = mlflow_ui(store, port)
        try:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{store}")
            experiment = mlflow.get_run(summary.run_id).info.experiment_id
            base = f"http://127.0.0.1:{port}/#"
            view = "?workflowType=machine_learning"  # the UI's model-training view (its default is GenAI)
            from urllib.parse import quote

            model, version = quote(summary.registry.model, safe=""), quote(summary.registry.version, safe="")
            print("MLflow UI:")
            shoot(f"{base}/experiments/{experiment}/runs{view}", args.out / "mlflow-runs.png", args.width + 320, 800, profile, 15000)
            shoot(f"{base}/experiments/{experiment}/runs/{summary.run_id}{view}", args.out / "mlflow-run.png",
                  args.width, 1000, profile, 15000)
            shoot(f"{base}/models/{model}{view}", args.out / "mlflow-model.png", args.width + 320, 900, profile, 15000)
            shoot(f"{base}/models/{model}/versions/{version}{view}", args.out / "mlflow-version.png",
                  args.width, 1100, profile, 15000)
        finally:
            stop(server)


if __name__ == "__main__":
    main()
