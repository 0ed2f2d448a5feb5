#!/bin/sh
# Entrypoint of the llava-sessions image. SageMaker starts a serving container
# as `docker run IMAGE serve`; anything else runs as given
# (`docker run IMAGE llava-sessions --help`, `docker run -it IMAGE bash`).
#
# serve: the affinity router on 0.0.0.0:8080 in front of TorchServe (which
# binds loopback only: inference, management and metrics), serving the model
# archive SageMaker copied to /opt/ml/model. Environment read here:
#   SAGEMAKER_BIND_TO_PORT  port to listen on (SageMaker sets it for some
#                           setups; default 8080)
#   LLAVA_SESSIONS_WORKERS  model copies, one worker each (default: one per GPU)
# Everything else (LLAVA_SESSIONS_SESSION_TTL_S, LLAVA_SESSIONS_MEMORY_BUDGET_BYTES,
# any LLAVA_SESSIONS_<FIELD> of ServingConfig) reaches the handler unchanged.
set -eu

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    if [ -n "${LLAVA_SESSIONS_WORKERS:-}" ]; then
        set -- --workers "$LLAVA_SESSIONS_WORKERS" "$@"
    fi
    set -- llava-sessions serve --host 0.0.0.0 --port "${SAGEMAKER_BIND_TO_PORT:-8080}" \
        --archive "${LLAVA_SESSIONS_MODEL_DIR:-/opt/ml/model}" "$@"
fi

# exec: no shell stays behind, so `docker stop` (SIGTERM) reaches the server,
# which stops TorchServe and its workers cleanly. As PID 1, tini forwards
# signals and reaps orphaned worker processes.
if [ "$$" -eq 1 ] && command -v tini >/dev/null 2>&1; then
    exec tini -- "$@"
fi
exec "$@"
