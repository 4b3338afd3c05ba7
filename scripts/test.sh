#!/usr/bin/env bash
# scripts/test.sh — the whole test suite, from a fresh machine.
#
# Installs (if missing) and starts NATS with JetStream, Redis and a
# MongoDB-protocol server under target/services (scripts/services.sh), then
# runs every test of the workspace against them. Services this script
# started are stopped again at the end; ones already running are left alone.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh -- --nocapture).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=0
if ! scripts/services.sh status >/dev/null 2>&1; then
  started=1
fi
cleanup() {
  if [[ $started -eq 1 ]]; then
    scripts/services.sh stop || true
  fi
}
trap cleanup EXIT

scripts/services.sh start
# shellcheck disable=SC1091
. target/services/env
export NATTER_NATS_URL NATTER_REDIS_URL NATTER_MONGO_URL

# Node.js and headless Chromium (Debian's packages, if missing), then the
# official socket.io-client and playwright-core (pinned by package-lock.json;
# playwright drives Debian's chromium and downloads no browser).
scripts/services.sh browser
# nginx (and the rest of scripts/cluster.sh's servers) for the fault tests
# (tests/faults: three NATS servers, three nodes and nginx on loopback).
scripts/services.sh tools >/dev/null
(cd tests/client && npm ci --no-audit --no-fund --loglevel=error)

echo "[test] cargo test --workspace (NATS $NATTER_NATS_URL, Redis $NATTER_REDIS_URL, MongoDB $NATTER_MONGO_URL)"
rm -f target/faults/*.txt
cargo test --workspace --locked "$@"
# The fault tests' figures (acknowledged, lost, duplicated, recovery time).
if compgen -G "target/faults/*.txt" >/dev/null; then
  echo "[test] fault test figures:"
  cat target/faults/*.txt
fi
