#!/usr/bin/env bash
# Installs what the tests run besides Rust. Packages go into target/:
#   python  a virtualenv in target/python with tests/python/requirements.txt
#   node    tests/node/package{,-lock}.json installed in target/node (npm ci),
#           and the Node example's pinned packages (examples/node/package.json)
#           in target/node-example
# Tools come from Debian's packages, installed only when missing (as root;
# otherwise the script says what to install):
#   tools   curl, git (the credential helper test clones with it),
#           systemd-analyze, node and npm (and python3-venv, when a
#           virtualenv cannot be made without it)
#   go      Go, protoc and Debian's Go gRPC packages (examples/go/build.sh)
# Idempotent and safe to run concurrently: does nothing when what is installed
# matches the pinned files. Used by .ci/run and by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
exec 9>target/.setup-deps.lock
flock 9

# Installs the Debian packages "$@" unless dpkg knows them all already.
debian_packages() {
  if dpkg -s "$@" >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing Debian packages; install them with: apt-get install $*" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tools() {
  local missing=()
  command -v curl >/dev/null || missing+=(curl)
  command -v git >/dev/null || missing+=(git)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v npm >/dev/null || missing+=(nodejs npm)
  if [ ${#missing[@]} -gt 0 ]; then
    debian_packages "${missing[@]}"
  fi
}

go_deps() {
  # The last package matters: with its default alternative, protobuf 1.3,
  # the generated code compiles but panics when it marshals a oneof.
  debian_packages golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc \
    golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
}

python_deps() {
  local venv=target/python
  if cmp -s tests/python/requirements.txt "$venv/.installed-requirements.txt"; then
    return
  fi
  if ! python3 -m venv "$venv" 2>/dev/null; then
    debian_packages python3-venv
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

[ $# -gt 0 ] || set -- tools python node go
for what in "$@"; do
  case "$what" in
    python) tools && python_deps ;;
    node) tools && node_deps && node_example_deps ;;
    tools) tools ;;
    go) go_deps ;;
    *) echo "usage: $0 [tools] [python] [node] [go]" >&2; exit 2 ;;
  esac
done
