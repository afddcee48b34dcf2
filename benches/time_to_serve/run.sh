#!/usr/bin/env bash
# Time to serve: from a traffic breach to the new node healthy in the
# target group, a cold launch vs a node from a stopped warm pool, on the
# local cloud's `debian` nodes (real boot, systemd, the stock
# nginx-php-fpm runbook, the PHP fixture), a real `hangar run`, the parts
# broken out; rounds alternate so both see the same machine.
#
#   sudo benches/time_to_serve/run.sh [--rounds 3] [--rps 12] [--hangar PATH]
#
# The time is the node's (boot, runbook, PHP) and the metric pipeline's;
# hangar's own share is waits and API calls, so the debug build measures
# what a release build would (and does not take ~15 minutes to build here).
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup --images >/dev/null
flock /tmp/hangar-cargo.lock cargo build -p hangar --bin hangar --example bench_time_to_serve >&2
args=("$@")
case " ${args[*]} " in
  *" --hangar "*) ;;
  *) args+=(--hangar target/debug/hangar) ;;
esac
# The bench prints /proc/loadavg before and after with its table.
exec target/debug/examples/bench_time_to_serve "${args[@]}"
