#!/usr/bin/env bash
# scripts/run.sh — run a natter node with its services, on a fresh machine.
#
# Installs (if missing) and starts NATS with JetStream, Redis and a
# MongoDB-protocol server under target/services, then runs
# `cargo run --release` against them on port 5000 (NATTER_PORT to change).
# The services keep running after natter stops (scripts/services.sh stop).
# A development JWT secret is created once in target/services/jwt-secret
# unless NATTER_JWT_SECRET is set. Extra arguments go to natter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh start
# shellcheck disable=SC1091
. target/services/env
export NATTER_NATS_URL NATTER_REDIS_URL NATTER_MONGO_URL

if [[ -z ${NATTER_JWT_SECRET:-} ]]; then
  secret_file=target/services/jwt-secret
  if [[ ! -s $secret_file ]]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secret_file")
  fi
  NATTER_JWT_SECRET=$(cat "$secret_file")
  export NATTER_JWT_SECRET
fi

exec cargo run --release --locked -- "$@"
