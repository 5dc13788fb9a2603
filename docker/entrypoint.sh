#!/bin/sh
# The kdsec image's entrypoint; then it runs the command it was given.
#
# Secrets: each file in /run/secrets (compose `secrets:`) is named after the environment variable
# it fills (KDSEC_MODEL_KEY, KDSEC_SIGNING_KEY), because kdsec reads its keys from the
# environment; this way they stay out of the image and out of `docker inspect`.
#
# MLflow: with MLFLOW_AUTH_CONFIG_PATH set (the MLflow server), that auth config is written (0600)
# at each start: MLflow reads the auth database URI only from this file and the URI holds the
# PostgreSQL password, so it is made from the environment here, never stored in the image or on a
# volume. The same settings as deployments/stack.py's mlflow_up().
set -eu

secrets_dir=${KDSEC_SECRETS_DIR:-/run/secrets}  # another folder only in tests
for file in "$secrets_dir"/*; do
    [ -f "$file" ] || continue
    name=$(basename "$file")
    case $name in
        [!A-Z_]* | *[!A-Z0-9_]*) continue ;;  # not an environment variable's name: not ours
    esac
    if [ ! -r "$file" ]; then
        echo "error: the secret $file is not readable by uid $(id -u): give it that uid in docker/compose.yaml" >&2
        exit 1
    fi
    if [ ! -s "$file" ]; then
        echo "error: the secret $name is empty: export $name before docker compose up (see docker/compose.yaml)" >&2
        exit 1
    fi
    value=$(cat "$file")
    export "$name=$value"
done

if [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    : "${MLFLOW_BACKEND_STORE_URI:?the MLflow server needs MLFLOW_BACKEND_STORE_URI (its auth tables live there too)}"
    mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
    (
        umask 077
        cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = $MLFLOW_BACKEND_STORE_URI
admin_username = admin
authorization_function = kdsec.mlflow_auth:authenticate
grant_default_workspace_access = false
INI
    )
fi

exec "$@"
