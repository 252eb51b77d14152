#!/usr/bin/env bash
# The demo starts and stops like a program: runs scripts/demo.sh with a given
# outboxd binary on a fresh state dir (later runs reuse its cluster), waits
# for /readyz, stops it with SIGTERM, SIGINT, and two Ctrl-Cs (SIGINT to its
# process group), and checks each time that outboxd drained and exited before
# PostgreSQL stopped and that nothing is left running; scripts/outboxd.sh
# must work while the demo runs and fail within 2 s with a hint once it is
# stopped; a second demo on the same state must be refused and leave the
# first running.
# Usage: scripts/demo-test.sh [path/to/outboxd]   (default: $OUTBOXD_BIN)
# Prints one closing line "N passed, M failed"; exits 1 on any failure.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BIN="${1:-${OUTBOXD_BIN:-}}"
if [ -z "$BIN" ]; then
  log "error: usage: scripts/demo-test.sh path/to/outboxd (or set OUTBOXD_BIN)"
  echo "0 passed, 1 failed"
  exit 1
fi
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
if [ ! -f "$BIN" ] || [ ! -x "$BIN" ]; then
  log "error: $BIN is not an executable file (build it first)"
  echo "0 passed, 1 failed"
  exit 1
fi
cd "$ROOT" || exit 1
ensure_postgres

# The demo gets only what it is given here: not the caller's database, NATS
# server, secret or outboxd settings (scripts/test.sh exports some).
unset DATABASE_URL NATS_URL JWT_SECRET PG_DIR PG_PORT
for v in $(compgen -e | grep '^OUTBOXD_' || true); do unset "$v"; done

WORK="$(mktemp -d /tmp/outboxd-demo-test.XXXXXX)"
# The server user must reach the cluster under it (start_postgres chowns it).
chmod 755 "$WORK"
STATE="$WORK/state"
PASSED=0
FAILED=0
DEMO_PID=""
OUTBOXD_PID=""

pass() { PASSED=$((PASSED + 1)); log "ok: $*"; }
fail() { FAILED=$((FAILED + 1)); log "FAILED: $*"; }

# The cluster's directory: under the state dir, or where its link points.
cluster_dir() {
  if [ -L "$STATE/pg/cluster" ]; then readlink -f "$STATE/pg/cluster"; else printf '%s' "$STATE/pg"; fi
}

# PIDs of postgres servers running on this run's cluster.
postgres_pids() {
  pgrep -f -- "$(cluster_dir)/data" || true
}

ms_now() { date +%s%3N; }

# readyz PORT: whether /readyz answers 200.
readyz() {
  local port="$1"
  if command -v curl >/dev/null 2>&1; then
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port/readyz" 2>/dev/null)" = 200 ]
  else
    timeout 2 bash -c '
      exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
      printf "GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
      IFS= read -r line <&3 && [[ "$line" == *" 200 "* ]]' _ "$port" 2>/dev/null
  fi
}

# Stops whatever a failed case left behind: the demo's process group,
# outboxd, PostgreSQL. Quiet, and safe to run twice.
cleanup() {
  trap '' INT TERM
  if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
    kill -TERM -- "-$DEMO_PID" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$DEMO_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL -- "-$DEMO_PID" 2>/dev/null || true
  fi
  DEMO_PID=""
  if [ -n "$OUTBOXD_PID" ] && kill -0 "$OUTBOXD_PID" 2>/dev/null; then
    kill -KILL "$OUTBOXD_PID" 2>/dev/null || true
  fi
  OUTBOXD_PID=""
  if [ -d "$WORK" ]; then
    local dir
    dir="$(cluster_dir)"
    if [ -n "$(postgres_pids)" ]; then stop_postgres "$STATE/pg"; fi
    for p in $(postgres_pids); do kill -KILL "$p" 2>/dev/null || true; done
    case "$dir" in /tmp/outboxd-pg.*) rm -rf "$dir" ;; esac
    rm -rf "$WORK"
  fi
}
finish() {
  cleanup
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ]
  exit
}
trap cleanup EXIT
trap 'fail "interrupted"; finish' INT TERM

# A background job of a script starts with SIGINT ignored, and a shell cannot
# trap a signal ignored on entry: demo.sh gets SIGINT back at its default,
# even when this script itself was started with it ignored.
DEFAULT_INT=()
if env --default-signal=INT true 2>/dev/null; then DEFAULT_INT=(env --default-signal=INT); fi

# start_demo PORT LOG: runs scripts/demo.sh in the background, in a process
# group of its own (job control on; a terminal's Ctrl-C reaches a whole
# group), and waits until /readyz answers. Sets DEMO_PID and OUTBOXD_PID.
start_demo() {
  local port="$1" log="$2" deadline
  set -m
  OUTBOXD_BIN="$BIN" OUTBOXD_STATE_DIR="$STATE" OUTBOXD_HTTP_PORT="$port" \
    "${DEFAULT_INT[@]}" bash "$ROOT/scripts/demo.sh" >"$log" 2>&1 &
  DEMO_PID=$!
  set +m
  deadline=$((SECONDS + 120))
  until readyz "$port"; do
    if ! kill -0 "$DEMO_PID" 2>/dev/null; then
      wait "$DEMO_PID"
      log "demo.sh exited with status $? before /readyz answered; its log:"
      tail -n 30 "$log" >&2
      DEMO_PID=""
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "/readyz did not answer 200 within 120 s; the demo's log:"
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 0.2
  done
  # outboxd is the script's child running "$BIN demo".
  local child
  OUTBOXD_PID=""
  for child in $(pgrep -P "$DEMO_PID" || true); do
    if [ "$(tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null)" = "$BIN demo " ]; then OUTBOXD_PID="$child"; fi
  done
  [ -n "$OUTBOXD_PID" ] || { log "no \"$BIN demo\" child of demo.sh (pid $DEMO_PID)"; return 1; }
}

# stop_case NAME HOW: starts the demo, stops it (HOW: term, int, ctrl-c-twice)
# and checks the stop.
stop_case() {
  local name="$1" how="$2" port log rc deadline problems=""
  port="$(free_port)"
  log="$WORK/demo-$how.log"
  if ! start_demo "$port" "$log"; then
    fail "$name: the demo did not start"
    cleanup_case
    return
  fi
  if [ "$how" = term ]; then
    # While it runs, scripts/outboxd.sh reaches its database.
    if OUTBOXD_BIN="$BIN" OUTBOXD_STATE_DIR="$STATE" timeout 30 \
      bash "$ROOT/scripts/outboxd.sh" dead-letters list --app demo >"$WORK/cli.out" 2>&1; then
      pass "scripts/outboxd.sh works while the demo runs"
    else
      fail "scripts/outboxd.sh failed while the demo runs: $(tail -n 3 "$WORK/cli.out")"
    fi
    # A second demo on the same state is refused at once, and the first
    # keeps its PostgreSQL (a second one used to stop it on its way out).
    OUTBOXD_BIN="$BIN" OUTBOXD_STATE_DIR="$STATE" OUTBOXD_HTTP_PORT="$port" timeout 30 \
      bash "$ROOT/scripts/demo.sh" >"$WORK/second-demo.out" 2>&1
    rc=$?
    if [ "$rc" != 0 ] && grep -q "a demo is already running" "$WORK/second-demo.out" \
      && ! grep -q "sign in as" "$WORK/second-demo.out" && readyz "$port" && [ -n "$(postgres_pids)" ]; then
      pass "a second demo on the same state is refused and leaves the first running"
    else
      fail "a second demo (exit $rc) did not leave the first alone: $(tail -n 3 "$WORK/second-demo.out")"
    fi
  fi
  case "$how" in
    term) kill -TERM "$DEMO_PID" ;;
    int) kill -INT "$DEMO_PID" ;;
    ctrl-c-twice)
      kill -INT -- "-$DEMO_PID"
      sleep 0.3
      kill -INT -- "-$DEMO_PID" 2>/dev/null || true
      ;;
  esac
  deadline=$((SECONDS + 60))
  while kill -0 "$DEMO_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  if kill -0 "$DEMO_PID" 2>/dev/null; then
    fail "$name: demo.sh still running 60 s after the signal; its log:"
    tail -n 30 "$log" >&2
    cleanup_case
    return
  fi
  wait "$DEMO_PID"
  rc=$?
  DEMO_PID=""
  case "$rc" in 0 | 130 | 143) ;; *) problems="$problems; demo.sh exited $rc" ;; esac
  kill -0 "$OUTBOXD_PID" 2>/dev/null && problems="$problems; outboxd (pid $OUTBOXD_PID) still running"
  [ -z "$(postgres_pids)" ] || problems="$problems; postgres still running: $(postgres_pids | tr '\n' ' ')"
  [ ! -e "$(cluster_dir)/data/postmaster.pid" ] || problems="$problems; postmaster.pid left behind"
  readyz "$port" && problems="$problems; port $port still answers"
  # In order: outboxd drained and exited 0, then PostgreSQL stopped.
  local drained stopped
  drained="$(grep -n 'outboxd drained and stopped' "$log" | head -n1 | cut -d: -f1)"
  stopped="$(grep -n 'stopping PostgreSQL' "$log" | head -n1 | cut -d: -f1)"
  if [ -z "$drained" ]; then
    problems="$problems; no \"outboxd drained and stopped\" in the log"
  elif [ -z "$stopped" ] || [ "$stopped" -lt "$drained" ]; then
    problems="$problems; PostgreSQL was not stopped after outboxd"
  fi
  if [ -z "$problems" ]; then
    pass "$name: outboxd drained, then PostgreSQL stopped; demo.sh exited $rc"
  else
    fail "$name: ${problems#; } (log: below)"
    tail -n 30 "$log" >&2
  fi
  cleanup_case
}

# Kills what a case left, keeping the state dir for the next case.
cleanup_case() {
  if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
    kill -KILL -- "-$DEMO_PID" 2>/dev/null || true
  fi
  DEMO_PID=""
  if [ -n "$OUTBOXD_PID" ] && kill -0 "$OUTBOXD_PID" 2>/dev/null; then kill -KILL "$OUTBOXD_PID" 2>/dev/null || true; fi
  OUTBOXD_PID=""
  if [ -n "$(postgres_pids)" ]; then stop_postgres "$STATE/pg"; fi
}

stop_case "SIGTERM to demo.sh" term
# A demo.pid left behind by a demo killed outright, naming a live process
# that is no demo, does not keep the next demo from starting.
sleep 300 &
STRAY=$!
echo "$STRAY" >"$STATE/demo.pid"
stop_case "SIGINT to demo.sh, with a stray demo.pid" int
kill "$STRAY" 2>/dev/null || true
stop_case "Ctrl-C twice (SIGINT to the process group)" ctrl-c-twice

# With the demo stopped, scripts/outboxd.sh fails at once with a hint.
if [ -d "$STATE/pg" ]; then
  start_ms="$(ms_now)"
  OUTBOXD_BIN="$BIN" OUTBOXD_STATE_DIR="$STATE" timeout 10 \
    bash "$ROOT/scripts/outboxd.sh" dead-letters list --app demo >"$WORK/cli-stopped.out" 2>&1
  rc=$?
  elapsed=$(($(ms_now) - start_ms))
  if [ "$rc" != 0 ] && grep -q "start it with scripts/demo.sh" "$WORK/cli-stopped.out" && [ "$elapsed" -lt 2000 ]; then
    pass "scripts/outboxd.sh against the stopped demo fails in ${elapsed} ms with the hint"
  else
    fail "scripts/outboxd.sh against the stopped demo: status $rc after ${elapsed} ms: $(tail -n 3 "$WORK/cli-stopped.out")"
  fi
else
  fail "scripts/outboxd.sh against the stopped demo: no demo state to test against"
fi

finish
