#!/bin/sh
# Run once by the postgres image, on an empty data directory, after it created $POSTGRES_DB
# (Prefect's database): MLflow's database (tracking store and auth tables), named in
# deployments/stack.env like the native stack's.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     --command "CREATE DATABASE \"${KDSEC_MLFLOW_DB:?KDSEC_MLFLOW_DB comes from deployments/stack.env}\""
