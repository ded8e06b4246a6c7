#!/bin/sh
# Builds examples/go/watch_and_call.go with Debian's Go toolchain and
# packages (GOPATH mode; no module downloads):
#
#   apt-get install golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc \
#       golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
#
# (The last one matters: with its default alternative, protobuf 1.3, the
# generated code compiles but panics when it marshals a oneof.)
#   examples/go/build.sh [OUTPUT]      # default target/go/watch_and_call
#
# The client package is generated from proto/ into target/go/src/tokenbroker/v1.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
work="$root/target/go"
out=${1:-"$work/watch_and_call"}
proto=tokenbroker/v1/tokenbroker.proto
mkdir -p "$work/src"
protoc -I "$root/proto" -I /usr/include \
  --go_out="$work/src" --go_opt=paths=source_relative --go_opt="M$proto=tokenbroker/v1" \
  --go-grpc_out="$work/src" --go-grpc_opt=paths=source_relative --go-grpc_opt="M$proto=tokenbroker/v1" \
  "$root/proto/$proto"
GOPATH="$work:/usr/share/gocode" GO111MODULE=off GOCACHE="$work/cache" GOFLAGS= \
  go build -o "$out" "$root/examples/go/watch_and_call.go"
