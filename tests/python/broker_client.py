"""A Python grpcio client compiled from proto/ at run time, talking to a
running broker over its Unix socket. Run by tests/polyglot.rs:

    python broker_client.py SOCKET PROTO_DIR OUT_DIR

Prints one JSON object describing what it saw; exits non-zero on any
unexpected result.
"""

import base64
import json
import sys
import time

import grpc
from grpc_tools import protoc


def compile_proto(proto_dir, out_dir):
    import grpc_tools

    well_known = grpc_tools.__path__[0] + "/_proto"
    status = protoc.main([
        "protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"{proto_dir}/tokenbroker/v1/tokenbroker.proto",
    ])
    if status != 0:
        sys.exit(f"protoc failed with {status}")
    sys.path.insert(0, out_dir)


def jwt_claims(token):
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))


def main():
    socket, proto_dir, out_dir = sys.argv[1:4]
    compile_proto(proto_dir, out_dir)
    from tokenbroker.v1 import tokenbroker_pb2 as pb
    from tokenbroker.v1 import tokenbroker_pb2_grpc as rpc

    # gRPC C-core (Python, Ruby, PHP, C++) sends the socket path as the HTTP/2
    # :authority, which the broker's HTTP/2 stack rejects as malformed; name
    # the authority "localhost", as grpc-go and Kubernetes do for sockets.
    channel = grpc.insecure_channel(
        f"unix://{socket}", options=[("grpc.default_authority", "localhost")]
    )
    broker = rpc.TokenBrokerStub(channel)
    seen = {}

    access = broker.GetAccessToken(
        pb.GetAccessTokenRequest(scopes=["https://www.googleapis.com/auth/cloud-platform"]),
        timeout=10,
    )
    assert access.token and access.token_type == "Bearer", access.token_type
    assert access.expire_time.seconds > time.time()
    seen["access_token"] = access.token

    audience = "https://hello-abc123-uc.a.run.app"
    id_token = broker.GetIdToken(
        pb.GetIdTokenRequest(audience=audience, format=pb.ID_TOKEN_FORMAT_FULL), timeout=10
    )
    claims = jwt_claims(id_token.token)
    assert claims["aud"] == audience, claims
    assert claims["exp"] == id_token.expire_time.seconds, (claims, id_token.expire_time)
    assert "google" in claims, claims
    seen["id_token_aud"] = claims["aud"]

    watch = broker.WatchToken(
        pb.WatchTokenRequest(id_token=pb.GetIdTokenRequest(audience=audience, format=pb.ID_TOKEN_FORMAT_FULL)),
        timeout=10,
    )
    first = next(watch)
    assert first.WhichOneof("token") == "id_token"
    assert first.id_token.token == id_token.token, "watch did not share the cached token"
    watch.cancel()
    seen["watch_first_matches"] = True

    try:
        broker.GetIdToken(pb.GetIdTokenRequest(audience=""), timeout=10)
        sys.exit("an empty audience was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.code()
        assert "audience" in error.details(), error.details()
        seen["empty_audience"] = error.code().name

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
