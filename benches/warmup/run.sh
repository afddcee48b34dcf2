#!/usr/bin/env bash
# What `release.warmup` buys a PHP node's first users: p50/p99 of the first
# 50 requests after activation, with and without hangar's warm-up, on a
# `debian` node (nginx + PHP-FPM + OPcache, stock runbook), rounds
# alternating so both see the same machine.
#
#   sudo benches/warmup/run.sh [--rounds 5] [--requests 50]
#
# The measured latency is the node's (PHP compiling ~200 files into OPcache);
# the client is a plain HTTP client, so a debug build measures the same.
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup >/dev/null
flock /tmp/hangar-cargo.lock cargo build -p hangar --example bench_warmup >&2
exec target/debug/examples/bench_warmup "$@"
