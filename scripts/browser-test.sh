#!/usr/bin/env bash
# The dashboard in a real browser: installs Debian's Chromium and Node's
# playwright-core (no browser download), starts `outboxd run` on a fresh
# database with dead letters, and drives the dashboard: sign in, check the
# badge, replay one dead letter, ignore another, check the database.
# Needs DATABASE_URL (a server where it may create a database), as set by
# scripts/test.sh. Screenshots go to target/browser/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_postgres
[ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is not set: run through scripts/test.sh"
[ -x /usr/bin/chromium ] || apt_install chromium
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
(cd tests/browser && npm install --no-audit --no-fund --loglevel=error >&2)

BIN="${OUTBOXD_BIN:-$ROOT/target/debug/outboxd}"
[ -x "$BIN" ] || cargo build --quiet -p outboxd
PSQL="$PG_BIN/psql"
SERVER_URL="${DATABASE_URL%/*}"
"$PSQL" "$SERVER_URL/postgres" -qc "DROP DATABASE IF EXISTS outboxd_browser" -c "CREATE DATABASE outboxd_browser" >/dev/null
export DATABASE_URL="$SERVER_URL/outboxd_browser"
# No relaying here. The rows go to a webhook target that refuses the
# connection (port 9, discard), so each fails and dead-letters.
unset NATS_URL
export OUTBOXD_CONFIG_DIR="$ROOT/config" OUTBOXD_ENV=test OUTBOXD_LOG__FILTER=warn
OUTBOXD_WEBHOOK__SECRET="$(head -c 24 /dev/urandom | base64 | tr -d '\n/+=')"
export OUTBOXD_WEBHOOK__SECRET
JWT_SECRET="$(head -c 48 /dev/urandom | base64 | tr -d '\n/+=' | head -c 48)"
export JWT_SECRET
ADMIN_EMAIL=admin@example.com
ADMIN_PASSWORD="$(head -c 24 /dev/urandom | base64 | tr -d '\n/+=' | head -c 20)"

"$BIN" migrate >/dev/null
"$BIN" app create shop >/dev/null
printf '%s\n' "$ADMIN_PASSWORD" | "$BIN" user create "$ADMIN_EMAIL" --admin --password-stdin >/dev/null
for n in 1 2 3 4; do
  # The webhook target refuses the connection, and one attempt is allowed:
  # each row becomes a dead letter at its first claim.
  "$BIN" enqueue --app shop --topic webhook:http://127.0.0.1:9/orders --payload "{\"order\": $n, \"customer\": \"c-$n\"}" --max-attempts 1 >/dev/null
done

PORT="$(free_port)"
OUTBOXD_HTTP__LISTEN="127.0.0.1:$PORT" "$BIN" run >/dev/null &
OUTBOXD_PID=$!
trap 'kill -TERM $OUTBOXD_PID 2>/dev/null; wait $OUTBOXD_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  [ "$("$PSQL" "$DATABASE_URL" -tAc "SELECT count(*) FROM dead_letters" 2>/dev/null)" = 4 ] && break
  sleep 0.1
done
[ "$("$PSQL" "$DATABASE_URL" -tAc "SELECT count(*) FROM dead_letters")" = 4 ] || die "the dead letters did not appear"

OUTBOXD_URL="http://127.0.0.1:$PORT" ADMIN_EMAIL="$ADMIN_EMAIL" ADMIN_PASSWORD="$ADMIN_PASSWORD" \
  PSQL="$PSQL" SCREENSHOT_DIR="$ROOT/target/browser" node tests/browser/dashboard.mjs
