"""Watches an ID token from tokenbroker and calls a URL with it.

The current token arrives at once and every refreshed one after it; each is
used for one call (a real program would keep the latest token and use it
for all its calls). If the broker restarts, the watch subscribes again
after a jittered backoff and goes on. The token itself is never printed.

    python -m venv venv && venv/bin/pip install grpcio==1.85.1 grpcio-tools==1.85.1
    venv/bin/python examples/python/watch_and_call.py \\
        --audience https://hello-abc123-uc.a.run.app [--url URL] [--calls N]

The socket is $TOKENBROKER_SOCKET, else /run/tokenbroker/tokenbroker.sock.
Stubs are generated from proto/ at start (grpc_tools), so nothing else is
needed. tests/it/examples.rs runs this against the broker and a local server.
"""

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request

import grpc

DEFAULT_SOCKET = "/run/tokenbroker/tokenbroker.sock"
# The broker was away or stopping, or the connection broke: subscribe again.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
PROTO_DIR = pathlib.Path(__file__).resolve().parents[2] / "proto"


def load_stubs(out_dir):
    """Generates the Python stubs of tokenbroker.proto into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__path__[0]) / "_proto"
    status = protoc.main([
        "protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "tokenbroker/v1/tokenbroker.proto"),
    ])
    if status != 0:
        sys.exit(f"protoc failed with status {status}")
    sys.path.insert(0, out_dir)
    from tokenbroker.v1 import tokenbroker_pb2, tokenbroker_pb2_grpc
    return tokenbroker_pb2, tokenbroker_pb2_grpc


def watch(broker, request):
    """Yields each token of the watch, across broker restarts; never an expired one.

    A stream that ends or breaks is opened again after a random wait of up
    to 50 ms, doubling to 5 s while the broker stays away. A refusal of the
    request itself (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is raised.
    """
    failures = 0
    while True:
        try:
            for update in broker.WatchToken(request, wait_for_ready=True):
                token = getattr(update, update.WhichOneof("token"))
                if token.expire_time.seconds > time.time():
                    failures = 0
                    yield token
        except grpc.RpcError as error:
            if error.code() not in TRANSIENT:
                raise
        failures += 1
        time.sleep(random.uniform(0, min(5.0, 0.05 * 2 ** (failures - 1))))


def call(url, token):
    """GETs url with the token as a bearer; returns the HTTP status."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audience", required=True, help="the ID token's audience")
    parser.add_argument("--url", help="the URL to call (default: the audience)")
    parser.add_argument("--calls", type=int, default=0, help="stop after this many calls (0: never)")
    parser.add_argument("--socket", default=os.environ.get("TOKENBROKER_SOCKET") or DEFAULT_SOCKET)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        pb, rpc = load_stubs(out_dir)
        channel = grpc.insecure_channel(f"unix://{args.socket}")
        broker = rpc.TokenBrokerStub(channel)
        request = pb.WatchTokenRequest(id_token=pb.GetIdTokenRequest(audience=args.audience))
        calls = 0
        try:
            for token in watch(broker, request):
                status = call(args.url or args.audience, token.token)
                expires = token.expire_time.ToJsonString()
                print(f"called {args.url or args.audience}: HTTP {status} (token expires {expires})", flush=True)
                if status >= 400:
                    return 1
                calls += 1
                if calls == args.calls:
                    return 0
        except grpc.RpcError as error:
            print(f"broker: {error.code().name}: {error.details()}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
