#!/usr/bin/env bash
# Control-plane scale benchmark: one hangar operator reconciling fleets of
# 100, 1,000 and 10,000 instances in a steady state against an in-memory
# cloud that counts every API call (operator/benches/control_plane/).
# Prints each run's report, then one summary table.
#
#   benches/control_plane/run.sh            # the full set (~3 minutes)
#   benches/control_plane/run.sh --quick    # 100 and 10,000 only, no extras
#
# Each fleet runs in its own process, so each peak RSS is its own. Every
# measured pass comes one 15 s resync after the warm-up pass (listing aged,
# metric evaluation due), as in production.
set -euo pipefail
cd "$(dirname "$0")/../.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true

# An optimized build (the `bench` profile) of the benchmark only.
build_log=target/control_plane-build.json
mkdir -p target/control_plane
flock /tmp/hangar-cargo.lock cargo bench -p hangar --bench control_plane --no-run \
  --message-format=json >"$build_log"
bin=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "control_plane" and m.get("executable"):
        print(m["executable"])
' "$build_log" | tail -1)
[ -x "$bin" ] || { echo "benchmark binary not found" >&2; exit 1; }

results=target/control_plane/results.jsonl
: >"$results"
n=0
run() {
  n=$((n + 1))
  local log="target/control_plane/run-$n.log"
  echo
  echo "### control_plane $*"
  "$bin" "$@" | tee "$log"
  sed -n 's/^RESULT //p' "$log" >>"$results"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
run --clusters 10 --per-cluster 10
if ! $quick; then
  run --clusters 100 --per-cluster 10
fi
run --clusters 1000 --per-cluster 10 $($quick || echo --sustained-secs 60)
if ! $quick; then
  # The same 10,000 instances in 100 clusters: Describe calls follow pages.
  run --clusters 100 --per-cluster 100
  # Health probes of every in-service node against a loopback HTTP server.
  run --clusters 1000 --per-cluster 10 --probes
fi

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print("| clusters × nodes | probes | steady pass CPU | wall | cached pass CPU | spec reload CPU | peak RSS (operator / incl. fake cloud) | EC2 Describe / pass | ELB / pass | GetMetricData / pass | naive EC2 + ELB / pass | idle |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    idle = "yes" if not r["resync_idle_violations"] else "NO: " + ", ".join(r["resync_idle_violations"])
    print(f'| {r["clusters"]} × {r["per_cluster"]} = {r["instances"]} | {"on" if r["probes"] else "off"} '
          f'| {r["resync"]["cpu_ms"]:.0f} ms | {r["resync"]["wall_ms"]:.0f} ms | {r["hot"]["cpu_ms"]:.0f} ms '
          f'| {r["reload_cpu_ms"]:.0f} ms | {r["operator_peak_rss_mib"]:.1f} / {r["peak_rss_mib"]:.1f} MiB '
          f'| {r["ec2_describe_per_pass"]} | {r["elb_per_pass"]} | {r["cloudwatch_gmd_per_pass"]} '
          f'| {r["naive_ec2_describe_per_pass"]} + {r["naive_elb_per_pass"]} | {idle} |')
print()
print("At a 15 s resync (one pass per 15 s): share of EC2's Describe refill (20/s) and ELB's bucket (10/s)")
for r in rows:
    e, l = r["ec2_describe_per_pass"] / 15, r["elb_per_pass"] / 15
    ne, nl = r["naive_ec2_describe_per_pass"] / 15, r["naive_elb_per_pass"] / 15
    print(f'  {r["instances"]:>6} instances / {r["clusters"]:>4} clusters: hangar EC2 {100*e/20:.2f} %, ELB {100*l/10:.2f} %; '
          f'naive EC2 {100*ne/20:.1f} %, ELB {100*nl/10:.1f} %; naive/hangar EC2 calls {r["naive_ec2_describe_per_pass"]/max(1,r["ec2_describe_per_pass"]):.0f}×')
    s = r.get("sustained")
    if s:
        print(f'    sustained run of the real runtime: EC2 {s["ec2_per_sec"]:.3f}/s ({100*s["ec2_per_sec"]/20:.2f} %), '
              f'ELB {s["elb_per_sec"]:.3f}/s ({100*s["elb_per_sec"]/10:.2f} %), GetMetricData {s["cw_per_sec"]:.1f}/s, '
              f'CPU {s["cpu_ms_per_sec"]:.1f} ms/s')
EOF
