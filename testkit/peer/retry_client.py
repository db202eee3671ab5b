"""A gRPC client on the C core (Python grpcio) with a service config, for grpc-pool's tests.

    retry_client.py TARGET SERVICE_CONFIG_JSON NAME...

Makes one unary echo.Echo/UnaryEcho call per NAME, one after another, on one channel with
the service config (retries enabled), each call's message being its name; prints
`NAME CODE` for each (`OK`, `UNAVAILABLE`, ...), then `done`. The server counts the
attempts, so the same document can be held to the same arithmetic in the pool and in the
C core.
"""

import sys

import grpc

# The peer server's encoder (this script's folder is on the import path).
from echo_peer import write_varint


def encode(name):
    """An EchoRequest whose message is `name` (field 1, bytes)."""
    data = name.encode()
    return b"\x0a" + write_varint(len(data)) + data


def main():
    target, service_config, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    options = [("grpc.service_config", service_config), ("grpc.enable_retries", 1)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(
            "/echo.Echo/UnaryEcho",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for name in names:
            try:
                call(encode(name), timeout=30)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            print(name, code, flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
