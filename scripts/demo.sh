#!/usr/bin/env bash
# Runs outboxd with the demo workload on a private PostgreSQL under .outboxd/.
# Installs PostgreSQL if missing, builds the binary, migrates, and runs until
# stopped.
#
# Stopping: Ctrl-C, or SIGINT or SIGTERM to this script's PID. outboxd gets
# SIGTERM and drains (in-flight work finishes, leases are released), the
# script waits for it, then stops PostgreSQL and exits 0 (outboxd's status if
# that was not 0; 130 or 143 when stopped before outboxd had started).
# Further Ctrl-Cs while stopping are ignored: the stop finishes in order.
# One demo runs per state directory: a second is refused before it starts
# anything, and the first keeps running.
#
# Knobs (environment):
#   OUTBOXD_HTTP_PORT=8080   serve the dashboard and API on this port
#                            (default: a free one, printed in the banner)
#   OUTBOXD_BIN=path         use this outboxd binary instead of building
#                            target/release/outboxd
#   OUTBOXD_STATE_DIR=dir    keep the cluster, secrets and password here
#                            instead of .outboxd/ (for tests)
# They are this script's, not outboxd settings: outboxd refuses unknown
# OUTBOXD_* variables, so they are not passed on to it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

OUTBOXD_PID=""
PG_STARTING=""
STOPPING=""

# One demo per state directory: a second one would take over the first's
# cluster and, failing on the port the first holds, stop that cluster on its
# way out, under the running demo. The lock (fd 9) is this script's alone:
# the servers it starts do not inherit it, so it ends with the script, even
# a killed one. demo.pid only names the holder in the message.
mkdir -p "$STATE_DIR"
DEMO_PID_FILE="$STATE_DIR/demo.pid"
exec 9>>"$STATE_DIR/demo.lock"
if ! flock -n 9; then
  running="$(cat "$DEMO_PID_FILE" 2>/dev/null || echo '?')"
  die "a demo is already running from $STATE_DIR (PID $running): use that one, stop it first (Ctrl-C in its terminal, or kill -TERM $running), or give this one a directory of its own with OUTBOXD_STATE_DIR=dir"
fi
echo "$$" >"$DEMO_PID_FILE"

# A stop request (SIGINT, SIGTERM): forward it to outboxd as SIGTERM, once;
# the main loop below keeps waiting until it has drained.
on_signal() {
  local code="$1"
  if [ -z "$OUTBOXD_PID" ]; then
    # Nothing to drain yet: the EXIT trap stops what was started.
    exit "$code"
  fi
  if [ -n "$STOPPING" ]; then
    log "already stopping: waiting for outboxd to finish draining"
    return 0
  fi
  STOPPING=1
  log "stopping: outboxd drains, then PostgreSQL stops"
  kill -TERM "$OUTBOXD_PID" 2>/dev/null || true
}

# On every exit: outboxd (if it still runs) first, then PostgreSQL. Signals
# are ignored from here on, so a second Ctrl-C cannot cut the stop short
# (pg_ctl and the rest inherit that).
cleanup() {
  local rc=$? pids pid
  trap '' INT TERM
  # outboxd, also when a signal came just as it was started.
  pids="$OUTBOXD_PID $(jobs -p 2>/dev/null || true)"
  for pid in $pids; do
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pid in $pids; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$PG_STARTING" ]; then
    log "stopping PostgreSQL"
    stop_postgres "$STATE_DIR/pg"
  fi
  if [ "$(cat "$DEMO_PID_FILE" 2>/dev/null)" = "$$" ]; then rm -f "$DEMO_PID_FILE"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

if [ -n "${OUTBOXD_BIN:-}" ]; then
  BIN="$OUTBOXD_BIN"
  [ -f "$BIN" ] && [ -x "$BIN" ] || die "OUTBOXD_BIN=$BIN is not an executable file"
  ensure_postgres
else
  ensure_rust
  ensure_postgres
  log "building outboxd (release)"
  cargo build --release --quiet -p outboxd
  BIN="$ROOT/target/release/outboxd"
fi
PG_STARTING=1
start_postgres "$STATE_DIR/pg" durable 9>&-

export OUTBOXD_ENV=demo
# A JWT secret and an admin account for the dashboard, made once and kept
# under .outboxd/ (readable by you only).
umask 077
[ -s "$STATE_DIR/jwt_secret" ] || head -c 48 /dev/urandom | base64 | tr -d '\n/+=' | head -c 48 >"$STATE_DIR/jwt_secret"
JWT_SECRET="$(cat "$STATE_DIR/jwt_secret")"
export JWT_SECRET
ADMIN_EMAIL=admin@example.com
[ -s "$STATE_DIR/admin_password" ] || head -c 24 /dev/urandom | base64 | tr -d '\n/+=' | head -c 20 >"$STATE_DIR/admin_password"
ADMIN_PASSWORD="$(cat "$STATE_DIR/admin_password")"
umask 022
HTTP_PORT="${OUTBOXD_HTTP_PORT:-$(free_port)}"
# The port is this script's knob, not a setting: outboxd refuses unknown
# OUTBOXD_* variables.
unset OUTBOXD_HTTP_PORT
export OUTBOXD_HTTP__LISTEN="127.0.0.1:$HTTP_PORT"
"$BIN" migrate
"$BIN" app create demo >/dev/null
printf '%s\n' "$ADMIN_PASSWORD" | "$BIN" user create "$ADMIN_EMAIL" --admin --password-stdin >/dev/null 2>&1 || true
cat <<TXT

  outboxd demo
  ------------
  database:      $DATABASE_URL
  dashboard:     http://127.0.0.1:$HTTP_PORT/login
  sign in as:    $ADMIN_EMAIL / $ADMIN_PASSWORD
  health:        http://127.0.0.1:$HTTP_PORT/healthz
  readiness:     http://127.0.0.1:$HTTP_PORT/readyz
  metrics:       http://127.0.0.1:$HTTP_PORT/metrics
  API (OpenAPI): http://127.0.0.1:$HTTP_PORT/api/openapi.json
  dead letters:  scripts/outboxd.sh dead-letters list --app demo   (in another terminal)
  stop:          Ctrl-C (drains in-flight work, then stops PostgreSQL)

TXT

# In the background, so that this shell handles the signals: a trapped
# signal interrupts `wait`, hence the loop; the last `wait` gives outboxd's
# exit status (bash keeps it after the process is gone).
"$BIN" demo 9>&- &
OUTBOXD_PID=$!
while kill -0 "$OUTBOXD_PID" 2>/dev/null; do
  wait "$OUTBOXD_PID" 2>/dev/null || true
done
status=0
wait "$OUTBOXD_PID" 2>/dev/null || status=$?
OUTBOXD_PID=""
if [ -z "$STOPPING" ]; then
  log "outboxd exited by itself (status $status)"
elif [ "$status" = 0 ]; then
  log "outboxd drained and stopped"
else
  log "outboxd stopped with status $status"
fi
exit "$status"
