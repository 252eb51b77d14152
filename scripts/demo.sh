#!/usr/bin/env bash
# Runs outboxd with the demo workload on a private PostgreSQL under .outboxd/.
# Installs PostgreSQL if missing, builds the binary, migrates, and runs until Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_rust
ensure_postgres

log "building outboxd (release)"
cargo build --release --quiet -p outboxd
start_postgres "$STATE_DIR/pg" durable
trap 'stop_postgres "$STATE_DIR/pg"' EXIT

BIN="$ROOT/target/release/outboxd"
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
  metrics:       http://127.0.0.1:$HTTP_PORT/metrics
  dead letters:  scripts/outboxd.sh dead-letters list --app demo   (in another terminal)
  stop:          Ctrl-C (drains in-flight work, then stops PostgreSQL)

TXT
"$BIN" demo
