#!/usr/bin/env bash
# Runs the whole test suite against a real, private PostgreSQL and a real
# JetStream nats-server: formatting, clippy, unit, property and integration
# tests, the chaos suite (scripts/chaos.sh), a benchmark smoke run, and the
# dashboard in a real Chromium; producers also through a real PgBouncer.
# Installs PostgreSQL, PgBouncer, nats-server, libfaketime, Chromium and
# playwright-core if they are missing.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_rust
ensure_postgres
ensure_pgbouncer
ensure_nats

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

TEST_DIR="$STATE_DIR/test-$$"
cleanup() { stop_pgbouncer "$TEST_DIR/pgbouncer"; stop_nats "$TEST_DIR/nats"; stop_postgres "$TEST_DIR"; rm -rf "$TEST_DIR"; }
trap cleanup EXIT
start_postgres "$TEST_DIR" fast
start_pgbouncer "$TEST_DIR/pgbouncer"
start_nats "$TEST_DIR/nats"

log "cargo test"
TEST_LOG="$TEST_DIR/cargo-test.log"
set +e
cargo test --workspace "$@" 2>&1 | tee "$TEST_LOG"
status=${PIPESTATUS[0]}
set -e

log "chaos suite (fault injection against real processes)"
set +e
bash "$ROOT/scripts/chaos.sh" 2>&1 | tee -a "$TEST_LOG"
chaos_status=${PIPESTATUS[0]}
set -e

log "benchmark smoke run (small sizes, no targets asserted)"
set +e
cargo build --quiet -p outbox-bench
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U outboxd -d postgres -qc "CREATE DATABASE bench_smoke" >/dev/null
DATABASE_URL="${DATABASE_URL%/*}/bench_smoke" OUTBOXD_LOG__FILTER=warn \
  OUTBOX_BENCH_PG_RESTART="$(postgres_restart_command fast)" target/debug/outbox-bench \
  --rows 2000 --enqueue-rows 500 --latency-samples 20 --relay-rows 1000 \
  --steady-secs 2 --steady-rate 500 --backlogs 2000,5000 --backlog-measured 500 \
  --scale-rows 2000 --processes 1,2 --phase-secs 2 --phase-sample-secs 1 --phase-rate 200 \
  --explain --out target/bench-smoke 2>&1 | tee -a "$TEST_LOG"
bench_status=${PIPESTATUS[0]}
set -e
if [ "$bench_status" = 0 ]; then echo "1 passed, 0 failed" | tee -a "$TEST_LOG"; else echo "0 passed, 1 failed" | tee -a "$TEST_LOG"; fi

log "browser test (Chromium)"
set +e
bash "$ROOT/scripts/browser-test.sh" 2>&1 | tee -a "$TEST_LOG"
browser_status=${PIPESTATUS[0]}
set -e

log "demo start and stop (scripts/demo.sh under SIGTERM and SIGINT)"
set +e
bash "$ROOT/scripts/demo-test.sh" "$ROOT/target/debug/outboxd" 2>&1 | tee -a "$TEST_LOG"
demo_status=${PIPESTATUS[0]}
set -e

# One closing line for the whole run: cargo prints one per test binary, and
# the browser test prints its own.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$TEST_LOG"
[ "$status" = 0 ] || exit "$status"
[ "$bench_status" = 0 ] || { log "the benchmark smoke run failed"; exit "$bench_status"; }
[ "$chaos_status" = 0 ] || { log "the chaos suite failed (logs in target/chaos/last-failure)"; exit "$chaos_status"; }
[ "$browser_status" = 0 ] || { log "the browser test failed"; exit "$browser_status"; }
[ "$demo_status" = 0 ] || { log "the demo start/stop test failed"; exit "$demo_status"; }
