#!/usr/bin/env bash
# Start a Kafka-protocol broker for the Kafka tests and `outbox-relay demo`: tansu 0.6.0
# with in-memory storage on 127.0.0.1:9092. Idempotent: installs tansu only if it is not
# on PATH, starts it only if nothing listens on the port, then waits until the port
# accepts connections.
#
#   scripts/kafka-broker.sh            # env: KAFKA_HOST, KAFKA_PORT, TANSU_LOG, TANSU_WAIT_SECS
set -euo pipefail

HOST="${KAFKA_HOST:-127.0.0.1}"
PORT="${KAFKA_PORT:-9092}"
LOG="${TANSU_LOG:-/tmp/tansu-broker-${PORT}.log}"
PIDFILE="/tmp/tansu-broker-${PORT}.pid"
WAIT_SECS="${TANSU_WAIT_SECS:-60}"
VERSION="0.6.0"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

say() { echo "kafka-broker: $*"; }

port_open() { (exec 3<>"/dev/tcp/${HOST}/${PORT}") 2>/dev/null; }

if port_open; then
    say "something already listens on ${HOST}:${PORT}; leaving it as it is"
    exit 0
fi

if ! command -v tansu >/dev/null 2>&1; then
    # Another `cargo install tansu` may be running (it takes ~15 min): wait for it
    # instead of starting a second one.
    if pgrep -f "cargo install.* tansu" >/dev/null 2>&1; then
        say "a tansu install is already running; waiting for it to finish"
        while pgrep -f "cargo install.* tansu" >/dev/null 2>&1; do sleep 5; done
    fi
    if ! command -v tansu >/dev/null 2>&1; then
        say "installing tansu ${VERSION} (cargo install, takes ~15 min)"
        cargo install --locked tansu --version "${VERSION}" --features dynostore \
            || { say "--locked install failed; retrying without --locked";
                 cargo install tansu --version "${VERSION}" --features dynostore; }
    fi
fi
say "using $(command -v tansu)"

say "starting tansu on ${HOST}:${PORT} (log: ${LOG})"
setsid nohup tansu broker \
    --listener-url "tcp://${HOST}:${PORT}" \
    --advertised-listener-url "tcp://${HOST}:${PORT}" \
    --storage-engine "memory://tansu/" \
    >"${LOG}" 2>&1 < /dev/null &
pid=$!
echo "${pid}" > "${PIDFILE}"

deadline=$((SECONDS + WAIT_SECS))
until port_open; do
    if ! kill -0 "${pid}" 2>/dev/null; then
        say "tansu exited before accepting connections; last log lines:"
        tail -n 30 "${LOG}" >&2 || true
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        say "tansu did not accept connections on ${HOST}:${PORT} within ${WAIT_SECS}s; see ${LOG}"
        exit 1
    fi
    sleep 0.2
done
say "tansu (pid ${pid}, pid file ${PIDFILE}) accepts connections on ${HOST}:${PORT}"
