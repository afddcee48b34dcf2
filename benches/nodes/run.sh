#!/usr/bin/env bash
# Ship a ~50 MB release to 10 local nodes with hangar, plain OpenSSH and
# Ansible, then re-run a 20-step idempotent runbook with hangar and Ansible;
# prints times, ratios and whether the targets were met.
#
#   sudo benches/nodes/run.sh [--nodes 10] [--size-mb 50] [--rounds 3]
#
# Needs root (nodes are mount namespaces with sshd on 127.77.x.y:22),
# openssh-server/-client, util-linux and python3 with venv. ansible-core is
# installed from PyPI into target/bench-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${HANGAR_BENCH_VENV:-$PWD/target/bench-venv}"
if [ ! -x "$venv/bin/ansible-playbook" ]; then
  echo "installing ansible-core into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'ansible-core>=2.16'
fi
"$venv/bin/ansible-playbook" --version | sed -n 1p >&2
ssh -V 2>&1 | sed 's/^/plain ssh: /' >&2

# Release build: measuring a debug build would be meaningless.
flock /tmp/hangar-cargo.lock cargo build --release -p hangar --example bench_nodes >&2
exec target/release/examples/bench_nodes --ansible-playbook "$venv/bin/ansible-playbook" "$@"
