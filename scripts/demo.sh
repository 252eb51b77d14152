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
HTTP_PORT="${OUTBOXD_HTTP_PORT:-$(free_port)}"
export OUTBOXD_HTTP__LISTEN="127.0.0.1:$HTTP_PORT"
"$BIN" migrate
cat <<TXT

  outboxd demo
  ------------
  database:      $DATABASE_URL
  health:        http://127.0.0.1:$HTTP_PORT/healthz
  metrics:       http://127.0.0.1:$HTTP_PORT/metrics
  dead letters:  scripts/outboxd.sh dead-letters list --app demo   (in another terminal)
  stop:          Ctrl-C (drains in-flight work, then stops PostgreSQL)

TXT
"$BIN" demo
