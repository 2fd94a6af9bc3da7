#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the test database, then runs every test.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test chat).
# Set PEERCHAT_TEST_MONGO_URI to run the database tests against your own MongoDB as well.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PEERCHAT_SECANTUSD="$(scripts/ensure-secantusdb.sh)"
export PEERCHAT_SECANTUSD
exec cargo test "$@"
