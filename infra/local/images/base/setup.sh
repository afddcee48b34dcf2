# Runs inside the freshly debootstrapped tree (systemd-nspawn, host network),
# after base/files/ was copied over it. Sourced by `build` with `set -eu`.

# The cloud's default user: authorized per instance (like user-data) by
# hangar-local, which writes /home/deploy/.ssh/authorized_keys before boot.
if ! id deploy >/dev/null 2>&1; then
  useradd --create-home --uid 1000 --user-group --shell /bin/bash deploy
fi
usermod -p '*' deploy   # no password, but not "locked": key logins work
install -d -o deploy -g deploy -m 0700 /home/deploy/.ssh
chmod 0440 /etc/sudoers.d/90-hangar-deploy
visudo -cq

systemctl enable hangar-ssh-host-keys.service ssh.service
# Nothing that runs apt or dpkg behind a test's back, no consoles to feed.
systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
  console-getty.service getty@.service systemd-networkd-wait-online.service
