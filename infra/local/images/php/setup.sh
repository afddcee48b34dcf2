# Runs inside a copy of the base image. Sourced by `build` with `set -eu`.
# Debian enables both units on install; the runbook configures and reloads them.
systemctl enable nginx.service php8.2-fpm.service
