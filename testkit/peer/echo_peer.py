"""A gRPC echo server on the gRPC C core (Python grpcio), for grpc-pool's tests.

It serves echo.Echo (see testkit/proto/echo.proto) and grpc.health.v1.Health on
127.0.0.1, with the server-side connection limits a real deployment sets, given as
flags that map onto the C core's channel arguments. It prints `listening <port>` once it
accepts connections, then reads commands, one per line, on standard input:

    serving          the health status of "" and "echo.Echo" becomes SERVING
    not_serving      ... NOT_SERVING
    count            answers `ok count <n>`: echo calls served so far
    quit             stops the server (also on end of input)

The echo messages are encoded by hand (three scalar fields), so no generated code is needed.
"""

import argparse
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def read_varint(data, pos):
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def write_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_request(data):
    """EchoRequest -> (message, repeat, delay_ms)."""
    message, repeat, delay_ms = b"", 0, 0
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = read_varint(data, pos)
            value = data[pos:pos + length]
            pos += length
            if field == 1:
                message = value
        elif wire == 0:
            value, pos = read_varint(data, pos)
            if field == 2:
                repeat = value
            elif field == 3:
                delay_ms = value
        else:
            raise ValueError("unexpected wire type %d" % wire)
    return message, repeat, delay_ms


def encode_response(message):
    """EchoResponse with `message`."""
    if not message:
        return b""
    return b"\x0a" + write_varint(len(message)) + message


CALLS = [0]
CALLS_LOCK = threading.Lock()


def count_call():
    with CALLS_LOCK:
        CALLS[0] += 1


def unary_echo(request, context):
    count_call()
    message, _, delay_ms = request
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    return message


def server_streaming_echo(request, context):
    count_call()
    message, repeat, delay_ms = request
    for _ in range(max(repeat, 1)):
        if delay_ms:
            time.sleep(delay_ms / 1000.0)
        yield message


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-connection-idle-ms", type=int)
    parser.add_argument("--max-connection-age-ms", type=int)
    parser.add_argument("--max-connection-age-grace-ms", type=int)
    parser.add_argument("--keepalive-permit-without-calls", type=int, choices=[0, 1])
    parser.add_argument("--min-ping-interval-without-data-ms", type=int)
    parser.add_argument("--max-ping-strikes", type=int)
    parser.add_argument("--max-concurrent-streams", type=int)
    args = parser.parse_args()

    options = []
    for flag, name in [
        ("max_connection_idle_ms", "grpc.max_connection_idle_ms"),
        ("max_connection_age_ms", "grpc.max_connection_age_ms"),
        ("max_connection_age_grace_ms", "grpc.max_connection_age_grace_ms"),
        ("keepalive_permit_without_calls", "grpc.keepalive_permit_without_calls"),
        ("min_ping_interval_without_data_ms", "grpc.http2.min_ping_interval_without_data_ms"),
        ("max_ping_strikes", "grpc.http2.max_ping_strikes"),
        ("max_concurrent_streams", "grpc.max_concurrent_streams"),
    ]:
        value = getattr(args, flag)
        if value is not None:
            options.append((name, value))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "UnaryEcho": grpc.unary_unary_rpc_method_handler(
                unary_echo, request_deserializer=decode_request, response_serializer=encode_response
            ),
            "ServerStreamingEcho": grpc.unary_stream_rpc_method_handler(
                server_streaming_echo, request_deserializer=decode_request, response_serializer=encode_response
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def set_status(status):
        for service in ("", "echo.Echo"):
            health_servicer.set(service, status)

    set_status(health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    server.start()
    print("listening %d" % port, flush=True)

    for line in sys.stdin:
        command = line.strip()
        if command == "serving":
            set_status(health_pb2.HealthCheckResponse.SERVING)
        elif command == "not_serving":
            set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        elif command == "count":
            with CALLS_LOCK:
                command = "count %d" % CALLS[0]
        elif command == "quit":
            break
        elif command:
            print("unknown command %r" % command, file=sys.stderr, flush=True)
            continue
        print("ok %s" % command, flush=True)
    server.stop(grace=0)


if __name__ == "__main__":
    main()
