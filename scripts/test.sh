#!/usr/bin/env bash
# The test command. Brings up what the tests need (Postgres, RabbitMQ, a Kafka-protocol
# broker), then runs every test against the real services in two phases:
#   1. all suites in parallel (each test uses its own table / exchange / topic names);
#   2. the fault suites (`faults_*` binaries), serially: they stop, restart or block the
#      shared services, so nothing else may run beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
if [[ -x scripts/kafka-broker.sh ]]; then scripts/kafka-broker.sh; fi
if [[ -x scripts/aws-emulator.sh ]]; then scripts/aws-emulator.sh; fi

export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export DATABASE_URL="${DATABASE_URL:-$TEST_DATABASE_URL}"
export TEST_AMQP_URL="${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

cargo build --locked --workspace --all-targets   # tools/ too: the bench and soak must keep building
echo "== phase 1: all suites, in parallel"
cargo nextest run --locked --profile ci -E 'not binary(/^faults/)'
if ls tests/faults_*.rs >/dev/null 2>&1; then
  echo "== phase 2: fault suites, one test at a time"
  cargo nextest run --locked --profile ci -E 'binary(/^faults/)' --test-threads 1
fi
