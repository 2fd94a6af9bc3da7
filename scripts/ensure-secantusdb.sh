#!/usr/bin/env bash
# Installs SecantusDB (a MongoDB-compatible server on WiredTiger) into ./.venv, pinned, once.
# Used by the tests (which start one per test) and by run-server.sh when no MongoDB is reachable.
# Prints nothing on success but the path of secantusd-py on stdout.
set -euo pipefail

SECANTUSDB_VERSION="0.7.0b3"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
marker="$venv/.secantusdb-$SECANTUSDB_VERSION"

if [[ ! -f "$marker" || ! -x "$venv/bin/secantusd-py" ]]; then
  python="$(command -v python3 || true)"
  if [[ -z "$python" ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      echo "installing python3 (needed for the SecantusDB test database)" >&2
      apt-get update -qq >&2 && apt-get install -y -qq python3 python3-venv >&2
      python="$(command -v python3)"
    else
      echo "error: python3 is needed to install SecantusDB; install python3 and python3-venv" >&2
      exit 1
    fi
  fi
  if ! "$python" -m venv "$venv" >&2; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      echo "installing python3-venv" >&2
      apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
      "$python" -m venv "$venv" >&2
    else
      echo "error: '$python -m venv' failed; install python3-venv" >&2
      exit 1
    fi
  fi
  echo "installing secantusdb==$SECANTUSDB_VERSION into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "secantusdb==$SECANTUSDB_VERSION" >&2
  touch "$marker"
fi
echo "$venv/bin/secantusd-py"
