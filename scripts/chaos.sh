#!/usr/bin/env bash
# The fault-injection suite: real outboxd processes against a private,
# durable PostgreSQL and nats-servers of its own, with kill -9, crashes,
# SIGSTOP, partitions, poison and clock skew; prints the results table and
# "N passed, M failed". Installs PostgreSQL, nats-server and libfaketime if
# they are missing.
# Usage: scripts/chaos.sh [--scenarios kill9,pg-crash,...] [--report FILE]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_rust
ensure_postgres
ensure_nats
if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
  apt_install faketime
fi

CHAOS_DIR="$STATE_DIR/chaos-$$"
cleanup() { stop_postgres "$CHAOS_DIR"; rm -rf "$CHAOS_DIR"; }
trap cleanup EXIT
# Durable: a crash of this cluster must be a real crash, not lost writes.
start_postgres "$CHAOS_DIR" durable
LIB="$ROOT/scripts/lib.sh"
export CHAOS_PG_CRASH="source '$LIB'; PG_BIN='$PG_BIN'; pg_run '$PG_BIN/pg_ctl' -D '$PG_DIR/data' -m immediate -w stop >/dev/null"
export CHAOS_PG_START="source '$LIB'; start_postgres '$PG_DIR' durable"

log "building outbox-chaos (the harness and its worker)"
cargo build --quiet -p outbox-chaos
mkdir -p "$CHAOS_DIR/work" target/chaos
log "running the chaos scenarios (logs under $CHAOS_DIR/work; kept in target/chaos on failure)"
set +e
target/debug/outbox-chaos --worker target/debug/outbox-chaos-worker --work-dir "$CHAOS_DIR/work" \
  --report target/chaos/report.md "$@"
status=$?
set -e
if [ "$status" != 0 ]; then
  rm -rf target/chaos/last-failure && cp -r "$CHAOS_DIR/work" target/chaos/last-failure
fi
exit "$status"
