#!/usr/bin/env bash
# Start, stop or inspect a local Ray head for `ray job submit`, with token authentication on
# and the dashboard / job API on 127.0.0.1 only.
#
#   cluster/local-head.sh start      # starts the head in the background
#   eval "$(cluster/local-head.sh env)"   # RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS
#   ray job submit --working-dir . -- python jobs/specialize.py --config jobs/configs/demo.yaml
#   cluster/local-head.sh status
#   cluster/local-head.sh stop       # stops this head only (not other Ray instances)
#
# Settings (environment): NEXUS_HEAD_DIR (state, logs and Ray's temp dir; default
# /tmp/nexus-head; keep it short, Ray puts Unix sockets there), NEXUS_HEAD_PORT (GCS, default
# 6379), NEXUS_DASHBOARD_PORT (default 8265), NEXUS_HEAD_CPUS (default: all),
# NEXUS_HEAD_EXTRA_ARGS (more `ray start` options, e.g. other ports), RAY (the ray executable;
# default .venv/bin/ray), RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token; created, mode 600,
# when missing). The head runs `ray start --head --block` in its own process group, so `stop`
# ends exactly its processes, never other Ray instances on the machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEXUS_VENV:-$ROOT/.venv}"
if [ -z "${RAY:-}" ] && [ -x "$VENV/bin/ray" ]; then
  RAY="$VENV/bin/ray"
fi
RAY="${RAY:-$(command -v ray || true)}"
# Job drivers run `python` from the head's PATH: the Python that has Ray and NEXUS's dependencies.
[ -n "$RAY" ] && export PATH="$(dirname "$RAY"):$PATH"
DIR="${NEXUS_HEAD_DIR:-/tmp/nexus-head}"
PORT="${NEXUS_HEAD_PORT:-6379}"
DASH_PORT="${NEXUS_DASHBOARD_PORT:-8265}"
TOKEN="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
PIDFILE="$DIR/head.pid"
LOG="$DIR/head.log"

die() { echo "local-head: $*" >&2; exit 1; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

ensure_token() {
  if [ ! -s "$TOKEN" ]; then
    mkdir -p "$(dirname "$TOKEN")"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN")
    echo "local-head: generated a new auth token in $TOKEN" >&2
  fi
  chmod 600 "$TOKEN"
}

print_env() {
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH='$TOKEN'"
  echo "export RAY_ADDRESS='http://127.0.0.1:$DASH_PORT'"
}

start() {
  [ -n "$RAY" ] || die "ray is not installed; run ./dev setup"
  running && die "already running (pid $(cat "$PIDFILE")); use status or stop"
  mkdir -p "$DIR"
  ensure_token
  local extra=()
  [ -n "${NEXUS_HEAD_CPUS:-}" ] && extra+=(--num-cpus "$NEXUS_HEAD_CPUS")
  # shellcheck disable=SC2206  # word splitting intended: a list of options
  [ -n "${NEXUS_HEAD_EXTRA_ARGS:-}" ] && extra+=(${NEXUS_HEAD_EXTRA_ARGS})
  # Token auth on (never RAY_AUTH_MODE=disabled); the node, the dashboard and the job API on
  # loopback only (a local head takes no other nodes).
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" setsid "$RAY" start --head --block \
    --node-ip-address 127.0.0.1 --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --include-dashboard true --temp-dir "$DIR/ray" --disable-usage-stats "${extra[@]}" \
    >"$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 120); do
    if ! running; then
      tail -n 20 "$LOG" >&2
      rm -f "$PIDFILE"
      die "the head exited; log: $LOG"
    fi
    if python3 - "$DASH_PORT" "$TOKEN" <<'EOF' 2>/dev/null; then
import sys, urllib.request
port, token = sys.argv[1], open(sys.argv[2]).read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/version", headers={"Authorization": f"Bearer {token}"})
urllib.request.urlopen(req, timeout=2)
EOF
      echo "local-head: running (pid $(cat "$PIDFILE")), dashboard and job API on http://127.0.0.1:$DASH_PORT" >&2
      echo "local-head: for clients run: eval \"\$($0 env)\"" >&2
      return 0
    fi
    sleep 1
  done
  die "the head did not come up within 120 s; log: $LOG"
}

stop() {
  if ! running; then
    rm -f "$PIDFILE"
    echo "local-head: not running" >&2
    return 0
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  # SIGTERM lets `ray start --block` shut its node down; then end what is left of its group.
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -TERM -- "-$pid" 2>/dev/null || true
  sleep 2
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "local-head: stopped" >&2
}

status() {
  if running; then
    echo "local-head: running (pid $(cat "$PIDFILE")), dashboard http://127.0.0.1:$DASH_PORT, GCS port $PORT"
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN" "$RAY" status --address "127.0.0.1:$PORT" 2>/dev/null || true
  else
    echo "local-head: not running"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) print_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
