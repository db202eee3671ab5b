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


def encode(name):
    data = name.encode()
    length = bytearray()
    n = len(data)
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            length.append(byte | 0x80)
        else:
            length.append(byte)
            break
    return b"\x0a" + bytes(length) + data


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
