"""A gRPC C core xDS client (Python grpcio), for grpc-pool's xDS cross-check.

    GRPC_XDS_BOOTSTRAP_CONFIG='{...}' xds_client.py TARGET

Opens one channel to TARGET (`xds:///name`): the C core's own xDS client resolves it through
the control plane of the bootstrap. Then reads commands on stdin, one a line:

    calls N     makes N unary echo.Echo/UnaryEcho calls, one after another (5 s deadline
                each, failing fast), and prints `ok K failed F CODE` (CODE: the last
                failure's status, or `-`)
    quit        ends

Prints `ready` first. The servers count the calls, so the test reads which endpoints the C
core sent them to.
"""

import sys

import grpc

REQUEST = b"\x0a\x05hello"  # an EchoRequest whose message is "hello"


def main():
    target = sys.argv[1]
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/echo.Echo/UnaryEcho",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            ok, failed, code = 0, 0, "-"
            for _ in range(int(words[1])):
                try:
                    call(REQUEST, timeout=5)
                    ok += 1
                except grpc.RpcError as error:
                    failed += 1
                    code = error.code().name
            print("ok", ok, "failed", failed, code, flush=True)


if __name__ == "__main__":
    main()
