#!/usr/bin/env bash
# Runs the whole test suite against a real, private PostgreSQL: formatting,
# clippy, unit and integration tests. Installs PostgreSQL if it is missing.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_rust
ensure_postgres

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

TEST_DIR="$STATE_DIR/test-$$"
cleanup() { stop_postgres "$TEST_DIR"; rm -rf "$TEST_DIR"; }
trap cleanup EXIT
start_postgres "$TEST_DIR" fast
export OUTBOXD_TEST_CONFIG_DIR="$ROOT/config"

log "cargo test"
cargo test --workspace "$@"
