#!/usr/bin/env bash
# scripts/cluster.sh — natter's production topology on one machine, on loopback:
# three NATS servers in one JetStream cluster (the log at three replicas),
# Redis, the MongoDB-protocol server, three natter nodes and nginx in front of
# them on one port. For trying natter as a user would, and for the fault tests.
#
#   scripts/cluster.sh up          install what is missing, start everything, wait
#                                  until it is ready; the last line is the URL
#   scripts/cluster.sh down        stop everything it started
#   scripts/cluster.sh status      each process: running or not, and the URL
#   scripts/cluster.sh start NAME  (re)start one process: nats1..3, redis, mongo,
#                                  natter1..3, nginx (after a fault test stopped it)
#   scripts/cluster.sh stop NAME   SIGTERM one process and wait for it to end
#   scripts/cluster.sh pid NAME    print its pid (for kill -9, SIGSTOP, …)
#
# Settings (environment):
#   NATTER_CLUSTER_DIR    where data, logs and pid files go (default target/cluster)
#   NATTER_CLUSTER_PORT   the load balancer's port (default 15400); the other
#                         processes use the ports above it:
#                           +1..+3 natter, +11..+13 NATS clients, +21..+23 NATS
#                           routes, +31..+33 NATS monitoring, +41 Redis, +42 MongoDB
#   NATTER_BIN            the natter binary (default: cargo build --release)
#   Other NATTER_* settings are passed to the nodes (e.g. NATTER_SENDS_PER_SEC).
#
# Configuration comes from deploy/: deploy/nats/n{1,2,3}.conf (ports and data
# directories overridden here) and deploy/nginx.conf (its per-deployment
# includes written to $NATTER_CLUSTER_DIR/nginx/).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"

DIR=${NATTER_CLUSTER_DIR:-$REPO_ROOT/target/cluster}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
BASE=${NATTER_CLUSTER_PORT:-15400}
[[ $BASE =~ ^[0-9]+$ ]] || { echo "NATTER_CLUSTER_PORT must be a number" >&2; exit 2; }
TIMEOUT=${NATTER_CLUSTER_TIMEOUT:-60}

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

NAMES=(nats1 nats2 nats3 redis mongo natter1 natter2 natter3 nginx)

nats_port() { echo $((BASE + 10 + $1)); }
route_port() { echo $((BASE + 20 + $1)); }
monitor_port() { echo $((BASE + 30 + $1)); }
node_port() { echo $((BASE + $1)); }
REDIS_PORT=$((BASE + 41))
MONGO_PORT=$((BASE + 42))
LB_URL="http://127.0.0.1:$BASE"

pidfile() { echo "$DIR/$1.pid"; }
logfile() { echo "$DIR/$1.log"; }

# The pid of NAME if it is alive (stopped with SIGSTOP counts as alive).
running_pid() {
  local pf pid state
  pf=$(pidfile "$1")
  [[ -s $pf ]] || return 1
  pid=$(<"$pf")
  [[ -r /proc/$pid/status ]] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [[ -n $state && $state != Z && $state != X ]] || return 1
  echo "$pid"
}

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# wait_for NAME WHAT CHECK...: poll CHECK until it succeeds, NAME dies or the deadline passes.
wait_for() {
  local name=$1 what=$2 start=$SECONDS
  shift 2
  # The process must be alive as well: an old one on the same port must
  # not pass for it.
  until running_pid "$name" >/dev/null && "$@"; do
    if ! running_pid "$name" >/dev/null; then
      log "$name exited while starting; last lines of $(logfile "$name"):"
      tail -n 30 "$(logfile "$name")" | sed 's/^/    /' >&2
      return 1
    fi
    if ((SECONDS - start >= TIMEOUT)); then
      log "$name: $what not within ${TIMEOUT}s; last lines of $(logfile "$name"):"
      tail -n 30 "$(logfile "$name")" | sed 's/^/    /' >&2
      return 1
    fi
    sleep 0.2
  done
}

# launch NAME CMD...: detached, in its own session, output to NAME.log.
launch() {
  local name=$1
  shift
  if running_pid "$name" >/dev/null; then
    log "$name already running (pid $(running_pid "$name"))"
    return 0
  fi
  [[ -f $(logfile "$name") ]] && mv -f "$(logfile "$name")" "$(logfile "$name").prev"
  setsid "$@" >"$(logfile "$name")" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

tools() {
  [[ -n ${NGINX_BIN:-} ]] && return 0
  local found
  found=$("$SCRIPT_DIR/services.sh" tools) || die "scripts/services.sh tools could not install the servers (see above)"
  eval "$found"
  command -v curl >/dev/null 2>&1 || die "curl is needed"
}

natter_bin() {
  if [[ -n ${NATTER_BIN:-} ]]; then
    [[ -x $NATTER_BIN ]] || die "NATTER_BIN=$NATTER_BIN is not an executable"
    return 0
  fi
  log "building natter (cargo build --release; the first build takes several minutes)"
  cargo build --release --locked --bin natter >&2 || die "cargo build failed"
  NATTER_BIN=$REPO_ROOT/target/release/natter
}

secret() {
  local f=$DIR/jwt-secret
  [[ -s $f ]] || head -c 48 /dev/urandom | base64 | tr -d '\n/+=' >"$f"
  cat "$f"
}

start_one() {
  local name=$1 i
  case $name in
    nats[123])
      i=${name#nats}
      mkdir -p "$DIR/$name"
      local routes="nats-route://127.0.0.1:$(route_port 1),nats-route://127.0.0.1:$(route_port 2),nats-route://127.0.0.1:$(route_port 3)"
      # deploy/nats/n$i.conf with this cluster's data directory (the
      # command line sets the ports).
      sed "s|^\( *store_dir:\).*|\1 \"$DIR/$name\"|" "deploy/nats/n$i.conf" >"$DIR/$name.conf"
      launch "$name" "$NATS_BIN" -c "$DIR/$name.conf" -a 127.0.0.1 -p "$(nats_port "$i")" \
        -m "$(monitor_port "$i")" \
        --cluster "nats://127.0.0.1:$(route_port "$i")" --routes "$routes"
      ;;
    redis)
      mkdir -p "$DIR/redis"
      launch redis "$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes \
        --appendfsync everysec --dir "$DIR/redis" --daemonize no --logfile ''
      ;;
    mongo)
      if [[ $MONGO_KIND == mongod ]]; then
        mkdir -p "$DIR/mongo"
        launch mongo mongod --dbpath "$DIR/mongo" --port "$MONGO_PORT" --bind_ip 127.0.0.1
      else
        launch mongo "$NX_BIN" --db "$DIR/mongo.sqlite" --host 127.0.0.1 -p "$MONGO_PORT" \
          --pid-file "$DIR/nx.pid" --log-file "$DIR/nx.log"
      fi
      ;;
    natter[123])
      i=${name#natter}
      launch "$name" env \
        NATTER_HOST=127.0.0.1 NATTER_PORT="$(node_port "$i")" \
        NATTER_NATS_URL="nats://127.0.0.1:$(nats_port 1),nats://127.0.0.1:$(nats_port 2),nats://127.0.0.1:$(nats_port 3)" \
        NATTER_STREAM_REPLICAS=3 \
        NATTER_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        NATTER_MONGO_URL="mongodb://127.0.0.1:$MONGO_PORT" \
        NATTER_JWT_SECRET="$(secret)" \
        NATTER_CLIENT_IP_HEADER=x-real-ip \
        NATTER_LOG_FORMAT="${NATTER_LOG_FORMAT:-text}" \
        "$NATTER_BIN"
      ;;
    nginx)
      local conf=$DIR/nginx
      mkdir -p "$conf/tmp"
      cp deploy/nginx.conf "$conf/nginx.conf"
      {
        echo "# written by scripts/cluster.sh"
        for i in 1 2 3; do echo "server 127.0.0.1:$(node_port "$i") max_fails=1 fail_timeout=5s;"; done
      } >"$conf/natter-servers.conf"
      echo "listen 127.0.0.1:$BASE;" >"$conf/natter-listen.conf"
      cat >"$conf/natter-local.conf" <<EOF
# written by scripts/cluster.sh: everything under $conf
access_log $DIR/nginx-access.log;
client_body_temp_path $conf/tmp/body;
proxy_temp_path $conf/tmp/proxy;
fastcgi_temp_path $conf/tmp/fastcgi;
uwsgi_temp_path $conf/tmp/uwsgi;
scgi_temp_path $conf/tmp/scgi;
EOF
      local global="daemon off; pid $conf/nginx.pid; error_log $(logfile nginx) warn;"
      ((EUID == 0)) && global+=" user root root;"
      "$NGINX_BIN" -t -q -p "$conf" -c "$conf/nginx.conf" -g "$global" 2>&1 | sed 's/^/    /' >&2 || true
      launch nginx "$NGINX_BIN" -p "$conf" -c "$conf/nginx.conf" -g "$global"
      ;;
    *) die "unknown process '$name' (one of: ${NAMES[*]})" ;;
  esac
}

# Waits until NAME serves.
ready_one() {
  local name=$1 i
  case $name in
    nats[123])
      i=${name#nats}
      wait_for "$name" "health" http_ok "http://127.0.0.1:$(monitor_port "$i")/healthz"
      ;;
    redis) wait_for redis "PING" redis_ping ;;
    mongo) wait_for mongo "connections" port_open "$MONGO_PORT" ;;
    natter[123])
      i=${name#natter}
      wait_for "$name" "readiness" http_ok "http://127.0.0.1:$(node_port "$i")/readyz"
      ;;
    nginx) wait_for nginx "a ready node behind it" http_ok "$LB_URL/readyz" ;;
  esac
}

redis_ping() { [[ $(timeout 2 redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# JetStream is ready for R3 streams once the servers elected a meta leader.
nats_cluster_ready() {
  curl -fsS --max-time 2 "http://127.0.0.1:$(monitor_port 1)/jsz" 2>/dev/null | grep -q '"leader"'
}

# SIGTERM and wait; SIGKILL after 20 s (then the exit status is 1: it did
# not stop cleanly).
stop_one() {
  local name=$1 pid start=$SECONDS rc=0
  pid=$(running_pid "$name") || { rm -f "$(pidfile "$name")"; return 0; }
  kill -CONT "$pid" 2>/dev/null || true  # a SIGSTOPped process cannot act on SIGTERM
  kill -TERM "$pid" 2>/dev/null || true
  while running_pid "$name" >/dev/null; do
    if ((SECONDS - start >= 20)); then
      log "$name (pid $pid) ignored SIGTERM for 20 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      rc=1
      break
    fi
    sleep 0.1
  done
  rm -f "$(pidfile "$name")"
  return $rc
}

cmd_up() {
  tools
  natter_bin
  local name
  for name in nats1 nats2 nats3 redis mongo; do start_one "$name"; done
  for name in nats1 nats2 nats3 redis mongo; do ready_one "$name" || { cmd_down; die "$name did not start"; }; done
  wait_for nats1 "a JetStream meta leader" nats_cluster_ready || { cmd_down; die "the NATS cluster formed no JetStream leader"; }
  # The first node creates the streams; the others find them.
  start_one natter1
  ready_one natter1 || { cmd_down; die "natter1 did not start"; }
  for name in natter2 natter3; do start_one "$name"; done
  for name in natter2 natter3 nginx; do
    [[ $name == nginx ]] && start_one nginx
    ready_one "$name" || { cmd_down; die "$name did not start"; }
  done
  log "up: NATS $(nats_port 1)-$(nats_port 3) (R3), Redis $REDIS_PORT, MongoDB $MONGO_PORT ($MONGO_KIND), natter $(node_port 1)-$(node_port 3), nginx $BASE; logs in $DIR"
  echo "$LB_URL"
}

cmd_down() {
  local i
  for ((i = ${#NAMES[@]} - 1; i >= 0; i--)); do stop_one "${NAMES[i]}" || true; done
  log "down (data kept in $DIR; remove it for a fresh cluster)"
}

cmd_status() {
  local name pid rc=0
  for name in "${NAMES[@]}"; do
    if pid=$(running_pid "$name"); then
      printf '%-8s running pid=%s\n' "$name" "$pid"
    else
      printf '%-8s stopped\n' "$name"
      rc=1
    fi
  done
  echo "$LB_URL"
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  start)
    [[ -n ${2:-} ]] || die "usage: $0 start NAME"
    tools
    [[ $2 == natter* ]] && natter_bin
    start_one "$2"
    ready_one "$2"
    ;;
  stop) [[ -n ${2:-} ]] || die "usage: $0 stop NAME"; stop_one "$2" ;;
  pid) [[ -n ${2:-} ]] || die "usage: $0 pid NAME"; running_pid "$2" ;;
  *) echo "usage: $0 up|down|status|start NAME|stop NAME|pid NAME" >&2; exit 2 ;;
esac
