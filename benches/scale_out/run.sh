#!/usr/bin/env bash
# A 50-node scale-out on the local cloud with AWS's API semantics on
# (token buckets, listing lag, ClientToken idempotency): time until every
# node is healthy in the target group, and hangar's API calls per family
# against AWS's default budgets.
#
#   sudo benches/scale_out/run.sh [--from 2] [--nodes 50] [--hangar PATH]
#
# `--hangar` runs another build of hangar against the same bench (an older
# commit's, to compare).
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup >/dev/null
flock /tmp/hangar-cargo.lock cargo build --release -p hangar --bin hangar --example bench_scale_out >&2
args=("$@")
case " ${args[*]} " in
  *" --hangar "*) ;;
  *) args+=(--hangar target/release/hangar) ;;
esac
exec target/release/examples/bench_scale_out "${args[@]}"
