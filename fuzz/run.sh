#!/usr/bin/env bash
# Fuzzes the spec loader and the runbook parser, each for a bounded time,
# and prints executions, coverage and findings per target.
#
#   fuzz/run.sh [seconds-per-target]      # default 60
#
# Installs cargo-fuzz from crates.io on first use. The machine has only
# stable Rust: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags
# cargo-fuzz passes (sanitizer coverage, AddressSanitizer). Crashes land in
# fuzz/artifacts/<target>/; turn each into a regression test (see
# fuzz/README.md) before fixing it.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
targets=(spec_loader runbook)
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  flock /tmp/hangar-cargo.lock cargo install cargo-fuzz --locked >&2
fi
cargo fuzz --version >&2

# Build once under the shared cargo lock, then run the binaries directly
# so the lock is not held while fuzzing. FUZZ_NO_BUILD=1 reuses the last
# build (the first one compiles hangar and the AWS SDK instrumented: ~30
# minutes on 2 cores).
bin_dir="target/x86_64-unknown-linux-gnu/release"
if [ "${FUZZ_NO_BUILD:-}" != 1 ] || [ ! -x "$bin_dir/${targets[0]}" ]; then
  flock /tmp/hangar-cargo.lock cargo fuzz build --sanitizer address >&2
fi

seed() {
  local dir="corpus/$1"
  shift
  mkdir -p "$dir"
  for f in "$@"; do
    [ -f "$f" ] && cp "$f" "$dir/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  return 0
}
seed spec_loader ../crds/tests/valid/*.yaml ../crds/tests/invalid/*.yaml ../examples/*.yaml \
  ../crds/tests/fuzz_regressions/*
seed runbook ../runbooks/*.yaml ../crds/tests/runbooks/*.yaml \
  ../operator/tests/fuzz_regressions/runbooks/*

mkdir -p logs
status=0
for t in "${targets[@]}"; do
  dict="dicts/$t.dict"
  [ "$t" = spec_loader ] && dict=dicts/spec.dict
  mkdir -p "artifacts/$t"
  echo "== $t: ${secs}s" >&2
  # -max_len 64 KiB: room for big documents; -rss_limit_mb and -timeout
  # turn unbounded memory or time into findings.
  set +e
  "$bin_dir/$t" "corpus/$t" \
    -dict="$dict" -max_total_time="$secs" -max_len=65536 \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1 | cut -d' ' -f2)
  corpus=$(ls "corpus/$t" | wc -l)
  found=$(ls "artifacts/$t" | wc -l)
  echo "$t: exit $rc, ${execs:-?} executions in ${secs}s, coverage ${cov:-?} edges, corpus $corpus files, $found artifacts in fuzz/artifacts/$t"
  if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ]; then
    status=1
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "logs/$t.log" | head -5 || true
  fi
done
exit "$status"
