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

# The official socket.io-client, for the Socket.IO tests (pinned by package-lock.json).
if ! command -v npm >/dev/null 2>&1; then
  echo "[test] node/npm missing: installing Debian's nodejs and npm" >&2
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
(cd tests/client && npm ci --no-audit --no-fund --loglevel=error)

# Headless Chromium for the browser tests (Debian's package, driven by
# playwright-core from tests/client; nothing is downloaded by npm).
if [[ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]]; then
  echo "[test] chromium missing: installing Debian's chromium" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

echo "[test] cargo test --workspace (NATS $NATTER_NATS_URL, Redis $NATTER_REDIS_URL, MongoDB $NATTER_MONGO_URL)"
cargo test --workspace --locked "$@"
