#!/usr/bin/env bash
# Runs the outboxd CLI against the demo's private PostgreSQL (started by scripts/demo.sh).
# Example: scripts/outboxd.sh dead-letters list --app demo
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
PORT_FILE="$STATE_DIR/pg/port"
[ -L "$STATE_DIR/pg/cluster" ] && PORT_FILE="$(readlink -f "$STATE_DIR/pg/cluster")/port"
[ -f "$PORT_FILE" ] || die "no demo database: run scripts/demo.sh first"
export DATABASE_URL="postgres://outboxd@127.0.0.1:$(cat "$PORT_FILE")/outboxd"
BIN="$ROOT/target/release/outboxd"
[ -x "$BIN" ] || cargo build --release --quiet -p outboxd
exec "$BIN" "$@"
