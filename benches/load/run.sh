#!/usr/bin/env bash
# benches/load/run.sh — measure natter under load on this machine.
#
#   benches/load/run.sh [--embedded] [NODES] [-- load.js options]
#   NATTER_BIN=path/to/natter benches/load/run.sh …   # another build
#
# Builds natter (release), starts the services (scripts/services.sh) unless
# --embedded, plus a NATS server of the run's own (its store is deleted at
# the end), starts NODES natter nodes (default 2; one when embedded) on
# ports 5101.. with a fresh stream, database and key prefix, runs
# benches/load/load.js against them (official socket.io-client, installed
# by npm ci in tests/client) with their pids and the services' pids for
# CPU figures, prints the table, and stops the nodes. Reports figures only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

embedded=0
if [[ ${1:-} == --embedded ]]; then embedded=1; shift; fi
count=${1:-2}
[[ $embedded == 1 ]] && count=1
shift || true
[[ ${1:-} == -- ]] && shift

# NATTER_BIN: measure that binary instead (e.g. an older build to compare).
bin=${NATTER_BIN:-target/release/natter}
if [[ -z ${NATTER_BIN:-} ]]; then cargo build --release --locked --quiet; fi
(cd tests/client && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

run=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
export NATTER_JWT_SECRET="load-$run-secret-load-$run"
export RUST_LOG=${RUST_LOG:-warn}
# The load tool registers its users from one address as fast as it can.
export NATTER_REGISTER_PER_HOUR=0 NATTER_LOGIN_PER_MIN=0 NATTER_SOCKETS_PER_IP=0
pids=()
service_pids=()
data=""
nats_pid=""
nats_dir=""
cleanup() {
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  if [[ -n $data ]]; then rm -rf "$data"; fi
  if [[ -n $nats_pid ]]; then kill "$nats_pid" 2>/dev/null || true; wait "$nats_pid" 2>/dev/null || true; fi
  if [[ -n $nats_dir ]]; then rm -rf "$nats_dir"; fi
}
trap cleanup EXIT
if [[ $embedded == 0 ]]; then
  scripts/services.sh start >/dev/null
  # shellcheck disable=SC1091
  . target/services/env
  export NATTER_NATS_URL NATTER_MONGO_URL NATTER_REDIS_URL
  # A NATS server of this run's own, its store removed afterwards: a load
  # run writes gigabytes of deliveries that must not fill the shared one.
  nats_bin=target/services/venv/bin/nats-server   # what services.sh installed, else PATH's
  [[ -x $nats_bin ]] || nats_bin=$(command -v nats-server)
  nats_dir=target/load-nats-$run
  nats_port=$((24000 + RANDOM % 1000))
  "$nats_bin" -c nats.conf -a 127.0.0.1 -p "$nats_port" -sd "$nats_dir" >"target/load-nats.log" 2>&1 &
  nats_pid=$!
  export NATTER_NATS_URL="nats://127.0.0.1:$nats_port"
  up=0
  for _ in $(seq 1 100); do
    kill -0 "$nats_pid" 2>/dev/null || break   # exited (port taken?)
    if (echo > "/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null; then up=1; break; fi
    sleep 0.1
  done
  if [[ $up == 0 ]]; then echo "the load run's nats-server did not start on port $nats_port (see target/load-nats.log)" >&2; exit 1; fi
  export NATTER_STREAM="LOAD$run" NATTER_SUBJECT_PREFIX="load$run" NATTER_MONGO_DB="load$run" NATTER_REDIS_PREFIX="load$run:"
  service_pids+=("nats=$nats_pid")
  for s in redis mongo; do service_pids+=("$s=$(cat "target/services/$s.pid")"); done
else
  data=$(mktemp -d "${TMPDIR:-/tmp}/natter-load-XXXXXX")
  export NATTER_DATA_DIR=$data NATTER_SYNC=${NATTER_SYNC:-always}
fi

urls=()
for i in $(seq 1 "$count"); do
  port=$((5100 + i))
  NATTER_HOST=127.0.0.1 NATTER_PORT=$port "$bin" >"target/load-node$i.log" 2>&1 &
  pids+=("$!")
  urls+=("http://127.0.0.1:$port")
done
for u in "${urls[@]}"; do
  for _ in $(seq 1 300); do
    curl -sf "$u/readyz" >/dev/null && break
    sleep 0.1
  done
done
pid_args=()
for p in "${pids[@]}"; do pid_args+=("natter=$p"); done
pid_args+=(${service_pids[@]+"${service_pids[@]}"})
NODE_PATH=tests/client/node_modules node benches/load/load.js \
  --nodes "$(IFS=,; echo "${urls[*]}")" --pids "$(IFS=,; echo "${pid_args[*]}")" "$@"
