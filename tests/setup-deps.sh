#!/usr/bin/env bash
# Installs what the cross-language tests run, into target/ (never system-wide):
#   python  a virtualenv in target/python with tests/python/requirements.txt
#   node    tests/node/package{,-lock}.json installed in target/node (npm ci),
#           and the Node example's pinned packages (examples/node/package.json)
#           in target/node-example
# Idempotent and safe to run concurrently: does nothing when what is installed
# matches the pinned files. Used by .ci/run and by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
exec 9>target/.setup-deps.lock
flock 9

python_deps() {
  local venv=target/python
  if cmp -s tests/python/requirements.txt "$venv/.installed-requirements.txt"; then
    return
  fi
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  cp tests/python/requirements.txt "$venv/.installed-requirements.txt"
}

node_deps() {
  local dir=target/node
  if cmp -s tests/node/package-lock.json "$dir/.installed-package-lock.json"; then
    return
  fi
  mkdir -p "$dir"
  cp tests/node/package.json tests/node/package-lock.json "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/node/package-lock.json "$dir/.installed-package-lock.json"
}

node_example_deps() {
  local dir=target/node-example
  if cmp -s examples/node/package.json "$dir/.installed-package.json"; then
    return
  fi
  mkdir -p "$dir"
  cp examples/node/package.json "$dir/"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error)
  cp examples/node/package.json "$dir/.installed-package.json"
}

[ $# -gt 0 ] || set -- python node
for what in "$@"; do
  case "$what" in
    python) python_deps ;;
    node) node_deps && node_example_deps ;;
    *) echo "usage: $0 [python] [node]" >&2; exit 2 ;;
  esac
done
