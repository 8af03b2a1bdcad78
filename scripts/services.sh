#!/usr/bin/env bash
# Services the tests need: a Redis server on 127.0.0.1:6379 for the shared-store backend.
# Installs redis-server if missing, starts it daemonized, waits until it answers PING.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null; then
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no \
        --logfile /tmp/seqkv-redis.log
fi
for _ in $(seq 1 100); do
    if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
        echo "redis: up on 127.0.0.1:6379"
        exit 0
    fi
    sleep 0.1
done
echo "redis: did not answer PING on 127.0.0.1:6379 (log: /tmp/seqkv-redis.log)" >&2
exit 1
