#!/usr/bin/env bash
# Ship a ~50 MB release to local nodes with hangar, plain OpenSSH and
# Ansible; ship a release with 1 % of its files changed with hangar (delta
# and whole), rsync --link-dest and Ansible's synchronize; re-run a 20-step
# idempotent runbook with hangar and Ansible. Prints medians, ratios, CPU
# (operator side, nodes, machine), bytes on the wire, and whether the
# targets were met.
#
#   sudo benches/nodes/run.sh [--nodes 10] [--size-mb 50] [--rounds 5]
#                             [--change-pct 1] [--skip ansible,delta,rerun,full]
#
# Needs root (nodes are mount namespaces with sshd on 127.77.x.y:22),
# openssh-server/-client, util-linux, rsync and python3 with venv. Ansible
# (with the ansible.posix collection, for synchronize) is installed from
# PyPI into target/bench-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v rsync >/dev/null || { echo "needs rsync: apt-get install -y rsync" >&2; exit 1; }
venv="${HANGAR_BENCH_VENV:-$PWD/target/bench-venv}"
if [ ! -d "$venv/lib" ] || ! ls "$venv"/lib/python3*/site-packages/ansible_collections/ansible/posix >/dev/null 2>&1; then
  echo "installing ansible into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'ansible-core>=2.16' 'ansible>=9'
fi
"$venv/bin/ansible-playbook" --version | sed -n 1p >&2
ssh -V 2>&1 | sed 's/^/plain ssh: /' >&2
rsync --version | sed -n 1p >&2

# Release build: measuring a debug build would be meaningless.
flock /tmp/hangar-cargo.lock cargo build --release -p hangar --example bench_nodes >&2
exec "${CARGO_TARGET_DIR:-target}/release/examples/bench_nodes" --ansible-playbook "$venv/bin/ansible-playbook" "$@"
