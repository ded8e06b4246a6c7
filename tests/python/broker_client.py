"""A Python grpcio client compiled from proto/ at run time, talking to a
running broker over its Unix socket with the channel a Python user writes
first: no options, so gRPC C-core sends the percent-encoded socket path as
the HTTP/2 :authority. Run by tests/it/polyglot.rs:

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


def health_status(channel):
    """grpc.health.v1 through grpcio-health-checking's stubs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(
        health_pb2.HealthCheckRequest(service="tokenbroker.v1.TokenBroker"), timeout=10
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def reflected_services(channel):
    """The services server reflection lists, through Python's reflection
    client, which speaks only grpc.reflection.v1alpha; and the broker's
    service resolved from the descriptors it returns."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(database.get_services())
    service = DescriptorPool(database).FindServiceByName("tokenbroker.v1.TokenBroker")
    assert "WatchToken" in [method.name for method in service.methods], service.methods
    return services


def main():
    socket, proto_dir, out_dir = sys.argv[1:4]
    compile_proto(proto_dir, out_dir)
    from tokenbroker.v1 import tokenbroker_pb2 as pb
    from tokenbroker.v1 import tokenbroker_pb2_grpc as rpc

    channel = grpc.insecure_channel(f"unix://{socket}")
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

    invalidated = broker.InvalidateToken(
        pb.InvalidateTokenRequest(
            id_token=pb.GetIdTokenRequest(audience=audience, format=pb.ID_TOKEN_FORMAT_FULL),
            token=id_token.token,
        ),
        timeout=10,
    )
    seen["invalidated"] = invalidated.invalidated
    fresh = broker.GetIdToken(
        pb.GetIdTokenRequest(audience=audience, format=pb.ID_TOKEN_FORMAT_FULL), timeout=10
    )
    assert fresh.token != id_token.token, "the invalidated token came back"

    seen["health"] = health_status(channel)
    seen["reflected_services"] = reflected_services(channel)

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
