"""Serve kd-pipeline on a cron schedule from this process (no work pool needed):

    uv run python deployments/serve.py            # nightly at 02:00 UTC
    KDSEC_CRON="*/30 * * * *" uv run python deployments/serve.py
"""

import os

from flows.kd_pipeline import kd_pipeline

if __name__ == "__main__":
    kd_pipeline.serve(
        name="kd-pipeline-served",
        cron=os.environ.get("KDSEC_CRON", "0 2 * * *"),
        parameters={"config_path": os.environ.get("KDSEC_CONFIG", "configs/default.yaml"), "overrides": []},
        tags=["kdsec"],
    )
