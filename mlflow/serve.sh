#!/usr/bin/env bash
# The MLflow tracking server for bpfm: runs and metrics in a database, artifacts proxied to S3 (or a
# folder), bound to localhost unless MLFLOW_HOST says otherwise. Every setting is an env var:
#   MLFLOW_HOST (127.0.0.1)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (1)
#   MLFLOW_BACKEND_STORE_URI (sqlite:///$PWD/.bpfm/mlflow-server.db; postgresql://... in production)
#   MLFLOW_ARTIFACTS_DESTINATION ($PWD/.bpfm/mlflow-artifacts; s3://bucket/prefix on a cluster)
#   AWS_ENDPOINT_URL_S3 / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for a non-AWS S3
# Extra arguments go to `mlflow server` (e.g. --allowed-hosts mlflow.internal:5000).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
mlflow_bin="${MLFLOW:-$root/.venv/bin/mlflow}"
[ -x "$mlflow_bin" ] || mlflow_bin="mlflow"

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/.bpfm/mlflow-server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/.bpfm/mlflow-artifacts}"
case "$backend" in sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;; esac

export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# The job runner and its huey consumers cost ~10 processes and 10 s of start-up; bpfm needs neither.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# MLflow's S3 artifact repository reads MLFLOW_S3_ENDPOINT_URL.
if [ -n "${AWS_ENDPOINT_URL_S3:-}" ]; then
  export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$AWS_ENDPOINT_URL_S3}"
fi

exec "$mlflow_bin" server \
  --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}" \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  "$@"
