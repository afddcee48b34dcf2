#!/usr/bin/env bash
# The floor under a delta release's node side (issue 18): what making a new
# release's tree of hard links costs by itself, for N nodes at once on this
# machine, with no SSH, no shell script around it and no verification.
#
#   benches/nodes/link_floor.sh [--nodes 10] [--files 2000] [--rounds 7]
#
# A release of FILES files in 43 directories (~54 MB, the shape of the
# bench's PHP release) is written once under /var/tmp. Each round then runs,
# for every node at once, and alternating which goes first:
#   link     `cp -al` of the whole tree into a new directory, then the one
#            `find -printf` listing a verification reads (what a delta that
#            changed nothing would still do);
#   link.py  the same in one python3 process per node (os.link, os.scandir):
#            what a node-side helper would do, without its start-up cost
#            counted apart;
#   list     the listing alone (the part that is not the links).
# Trees are moved aside, never deleted between rounds (see BENCHMARKS.md:
# ext4's allocator scans recently freed inodes). Prints each round's wall,
# user and system seconds and the medians.
set -euo pipefail

nodes=10 files=2000 rounds=7
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "link_floor.sh: unknown argument $1 (--nodes, --files, --rounds)" >&2; exit 2 ;;
  esac
done
py=/usr/bin/python3
[ -x "$py" ] || py=$(command -v python3)

work=$(mktemp -d /var/tmp/hangar-link-floor.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$py" - "$work/base" "$files" <<'EOF'
import os, random, sys
top, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
for i in range(n):
    d = os.path.join(top, "vendor", f"p{i % 43}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}.php"), "wb") as f:
        f.write(rng.randbytes(rng.randint(1000, 50000)))
EOF
cat >"$work/link.py" <<'EOF'
import os, stat, sys
src, dst = sys.argv[1], sys.argv[2]
def walk(top, rel=""):
    with os.scandir(os.path.join(top, rel)) as it:
        for e in it:
            p = os.path.join(rel, e.name)
            st = e.stat(follow_symlinks=False)
            yield p, st
            if stat.S_ISDIR(st.st_mode):
                yield from walk(top, p)
os.mkdir(dst)
for p, st in walk(src):
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(os.path.join(dst, p))
    else:
        os.link(os.path.join(src, p), os.path.join(dst, p))
sum(st.st_size for _, st in walk(dst))
EOF
listing() { (cd "$1" && LC_ALL=C find . -mindepth 1 -printf '%P\t%y\t%m\t%T@\t%s\t%l\t%D\t%i\t%C@\n' >/dev/null); }
one() {
  local mode=$1 round=$2 i d
  for i in $(seq "$nodes"); do
    d="$work/$mode.$round.$i"
    case "$mode" in
      link) (mkdir "$d" && cd "$work/base" && find . -type f -printf '%P\0' \
              | xargs -0 cp -al --parents -t "$d" -- && listing "$d") & ;;
      link.py) "$py" -I -S "$work/link.py" "$work/base" "$d" & ;;
      list) listing "$work/base" & ;;
    esac
  done
  wait
}
TIMEFORMAT='%R %U %S'
modes=(link link.py list)
echo "machine: $(nproc) cores, $(uname -sr), $(df -T /var/tmp | awk 'NR==2{print $2}') under /var/tmp, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$nodes nodes at once, $files files ($(du -sm "$work/base" | cut -f1) MB) each"
for r in $(seq "$rounds"); do
  # Rotate the order so no mode always runs first.
  for k in 0 1 2; do
    m=${modes[$(( (r + k) % 3 ))]}
    t=$( { time one "$m" "$r" >/dev/null 2>&1; } 2>&1 )
    echo "round $r $m $t" | tee -a "$work/times"
  done
done
"$py" - "$work/times" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    _, _, mode, wall, user, sys_ = line.split()
    rows.setdefault(mode, []).append((float(wall), float(user), float(sys_)))
base = statistics.median(w for w, _, _ in rows["list"])
print("| mode | wall (median) | user | system | vs list |")
print("|---|---:|---:|---:|---:|")
for mode in ("link", "link.py", "list"):
    r = rows[mode]
    med = lambda i: statistics.median(x[i] for x in r)
    print(f"| {mode} | {med(0):.2f} s | {med(1):.2f} s | {med(2):.2f} s | {med(0) / base:.1f}x |")
EOF
