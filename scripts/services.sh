#!/usr/bin/env bash
# Make sure the local services the tests use are up: PostgreSQL on 127.0.0.1:5432,
# RabbitMQ on 127.0.0.1:5672, NATS with JetStream on 127.0.0.1:4222 and Redis on
# 127.0.0.1:6379 (started the way this machine kind starts them), and the build
# prerequisites for rdkafka's bundled librdkafka. Idempotent.
set -euo pipefail

wait_port() { # host port name seconds
  local deadline=$((SECONDS + $4))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    if ((SECONDS > deadline)); then echo "services: $3 not listening on $1:$2" >&2; return 1; fi
    sleep 0.5
  done
  echo "services: $3 up on $1:$2"
}

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
wait_port 127.0.0.1 5432 PostgreSQL 60
until pg_isready -h 127.0.0.1 -p 5432 -q; do sleep 0.5; done

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
fi
wait_port 127.0.0.1 5672 RabbitMQ 120
# A previous run may have left the app stopped or an alarm set: undo both.
rabbitmqctl -q start_app >/dev/null 2>&1 || true
rabbitmqctl -q set_vm_memory_high_watermark 0.4 >/dev/null 2>&1 || true
rabbitmqctl -q await_startup >/dev/null 2>&1 || true

# NATS with JetStream on 127.0.0.1:4222 (the nats sink's tests; Debian's nats-server).
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  if [[ ! -x /usr/sbin/nats-server ]]; then
    echo "services: installing nats-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
  fi
  echo "services: starting nats-server"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
wait_port 127.0.0.1 4222 nats-server 30
# Redis on 127.0.0.1:6379 without persistence (the Redis sink's tests; the fault suite
# restarts it with this same command).
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  if ! command -v redis-server >/dev/null; then
    echo "services: installing redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools
  fi
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_port 127.0.0.1 6379 Redis 30

# rdkafka builds librdkafka from source: it needs a C toolchain, make, pkg-config, zlib
# and OpenSSL headers.
missing=()
for pkg in pkg-config libssl-dev zlib1g-dev make g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "services: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
