#!/usr/bin/env bash
# Regenerates testkit/src/echo.rs from testkit/proto/echo.proto and src/etcd/proto.rs from
# proto/etcd.proto (pure Rust, no protoc).
set -euo pipefail
cd "$(dirname "$0")/regen-proto"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/grpc-pool-regen-target}" cargo run --quiet
