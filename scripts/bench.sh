#!/usr/bin/env bash
# Every benchmark the README's table comes from, on a fresh machine: installs redis-server for the
# side-by-side column if it is missing (root + apt-get), then runs the fan-out bench against
# peerchat and Redis (best of 3 runs each, at 64 and 256 messages in flight per sender; then idle memory and
# the reconnect storm of 10 000 clients), the same fan-out at N=100 P=10 plain and over TLS (each server
# serving TLS only, with a certificate the bench makes), and the persistence bench (which installs
# SecantusDB). Extra arguments go to both broadcast runs, e.g. scripts/bench.sh --runs 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v redis-server >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing redis-server (the bench starts its own instance on a free port)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
    # The package starts a system instance; the bench does not need it.
    systemctl stop redis-server 2>/dev/null || service redis-server stop 2>/dev/null || true
  else
    echo "redis-server is missing and cannot be installed here; peerchat runs alone" >&2
  fi
fi
cargo bench --bench broadcast -- --peer redis --runs 3 --window 64,256 "$@"
cargo bench --bench broadcast -- --tls --peer redis --runs 3 --window 64,256 "$@"
cargo bench --bench persist
# Three cluster nodes on one database. With secantusd-py (the default) the database is the limit
# at 1 000 msgs/s; PEERCHAT_SECANTUSD=~/.cargo/bin/secantusd-rs measures with the faster one.
cargo bench --bench broadcast -- --nodes 3
