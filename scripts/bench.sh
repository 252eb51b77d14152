#!/usr/bin/env bash
# Runs the benchmark (`outbox-bench`) on a fresh private PostgreSQL with full durability
# (fsync and synchronous_commit on) and a fresh JetStream nats-server (file
# storage) for the relay scenarios. Extra arguments go to `outbox-bench`,
# e.g. scripts/bench.sh --rows 200000
# OUTBOX_BENCH_POSTGRES=stock leaves autovacuum at PostgreSQL's defaults
# (the cluster otherwise wakes autovacuum every second; see
# docs/performance.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_rust
ensure_postgres
ensure_nats
cargo build --release --quiet -p outbox-bench
BENCH_DIR="$STATE_DIR/bench-$$"
cleanup() { stop_nats "$BENCH_DIR/nats"; stop_postgres "$BENCH_DIR"; rm -rf "$BENCH_DIR"; }
trap cleanup EXIT
BENCH_POSTGRES="${OUTBOX_BENCH_POSTGRES:-durable}"
case "$BENCH_POSTGRES" in
  durable | stock) ;;
  *) die "OUTBOX_BENCH_POSTGRES must be durable or stock, not $BENCH_POSTGRES" ;;
esac
start_postgres "$BENCH_DIR" "$BENCH_POSTGRES"
start_nats "$BENCH_DIR/nats"
# For the postgres-restart phase.
OUTBOX_BENCH_PG_RESTART="$(postgres_restart_command "$BENCH_POSTGRES")"
export OUTBOX_BENCH_PG_RESTART
OUTBOXD_LOG__FILTER=warn "$ROOT/target/release/outbox-bench" "$@"
