#!/usr/bin/env bash
# Runs the outboxd CLI against the demo's private PostgreSQL (started by scripts/demo.sh).
# Example: scripts/outboxd.sh dead-letters list --app demo
# OUTBOXD_BIN=path uses that binary instead of target/release/outboxd (built
# when missing); OUTBOXD_STATE_DIR=dir looks for the demo there instead of .outboxd/;
# OUTBOXD_ENV (default demo, as the demo) picks the configuration overlay.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
# Help, the version and `config` need no database.
needs_db=1
first=""
skip=""
for arg in "$@"; do
  if [ -n "$skip" ]; then skip=""; continue; fi
  case "$arg" in
    -h|--help|-V|--version|help) needs_db="" ;;
    --env|--config-dir) skip=1 ;;  # their value is not the command
    -*) ;;
    *) [ -n "$first" ] || first="$arg" ;;
  esac
done
[ "$first" = config ] && needs_db=""
PORT_FILE="$STATE_DIR/pg/port"
[ -L "$STATE_DIR/pg/cluster" ] && PORT_FILE="$(readlink -f "$STATE_DIR/pg/cluster")/port"
if [ -f "$PORT_FILE" ]; then
  PORT="$(cat "$PORT_FILE")"
  export DATABASE_URL="postgres://outboxd@127.0.0.1:$PORT/outboxd"
elif [ -n "$needs_db" ]; then
  die "no demo database: run scripts/demo.sh first"
fi
if [ -n "$needs_db" ]; then
  # Fail at once, not after the driver's connect timeout, when the demo is not running.
  PG_BIN="$(pg_bindir)"
  if [ -n "$PG_BIN" ] && [ -x "$PG_BIN/pg_isready" ]; then
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 1 >/dev/null 2>&1 && up=1 || up=""
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && up=1 || up=""
  fi
  [ -n "$up" ] || die "the demo's PostgreSQL is not running: start it with scripts/demo.sh"
fi
# The demo's overlay, as scripts/demo.sh runs with it: `config` then prints
# what the demo uses, and a second process runs as the demo does.
export OUTBOXD_ENV="${OUTBOXD_ENV:-demo}"
if [ -n "${OUTBOXD_BIN:-}" ]; then
  BIN="$OUTBOXD_BIN"
  [ -f "$BIN" ] && [ -x "$BIN" ] || die "OUTBOXD_BIN=$BIN is not an executable file"
else
  BIN="$ROOT/target/release/outboxd"
  [ -x "$BIN" ] || cargo build --release --quiet -p outboxd
fi
exec "$BIN" "$@"
