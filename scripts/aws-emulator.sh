#!/usr/bin/env bash
# Start an AWS emulator (moto's server mode) for the SQS/SNS tests and `outbox-relay demo`
# on 127.0.0.1:5000. Idempotent: installs moto[server] with pip only if `moto_server` is
# not on PATH, starts it only if nothing listens on the port, then waits until it answers.
# moto keeps all state in memory: restarting it loses every queue and topic.
#
#   scripts/aws-emulator.sh            # env: MOTO_HOST, MOTO_PORT, MOTO_LOG, MOTO_WAIT_SECS
set -euo pipefail

HOST="${MOTO_HOST:-127.0.0.1}"
PORT="${MOTO_PORT:-5000}"
LOG="${MOTO_LOG:-/tmp/moto-server-${PORT}.log}"
PIDFILE="/tmp/moto-server-${PORT}.pid"
WAIT_SECS="${MOTO_WAIT_SECS:-60}"

say() { echo "aws-emulator: $*"; }

answers() { curl -s -o /dev/null -m 2 "http://${HOST}:${PORT}/moto-api/" ; }

if answers; then
    say "something already answers on http://${HOST}:${PORT}; leaving it as it is"
    exit 0
fi

if ! command -v moto_server >/dev/null 2>&1; then
    PIP="$(command -v pip3 || command -v pip || true)"
    if [[ -z "${PIP}" ]]; then
        say "neither moto_server nor pip is installed; install python3-pip (or moto[server]) first" >&2
        exit 1
    fi
    say "installing moto[server] with ${PIP}"
    "${PIP}" install --quiet 'moto[server]' \
        || "${PIP}" install --quiet --user 'moto[server]' \
        || "${PIP}" install --quiet --break-system-packages 'moto[server]'
    hash -r
    export PATH="${HOME}/.local/bin:${PATH}"
    command -v moto_server >/dev/null 2>&1 \
        || { say "moto_server is still not on PATH after pip install" >&2; exit 1; }
fi
say "using $(command -v moto_server)"

say "starting moto_server on ${HOST}:${PORT} (log: ${LOG})"
setsid nohup moto_server -H "${HOST}" -p "${PORT}" >"${LOG}" 2>&1 < /dev/null &
pid=$!
echo "${pid}" > "${PIDFILE}"

deadline=$((SECONDS + WAIT_SECS))
until answers; do
    if ! kill -0 "${pid}" 2>/dev/null; then
        say "moto_server exited before answering; last log lines:" >&2
        tail -n 30 "${LOG}" >&2 || true
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        say "moto_server did not answer on http://${HOST}:${PORT} within ${WAIT_SECS}s; see ${LOG}" >&2
        exit 1
    fi
    sleep 0.2
done
say "moto_server (pid ${pid}, pid file ${PIDFILE}) answers on http://${HOST}:${PORT}"
