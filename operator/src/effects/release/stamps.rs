//! Stat stamps: what identifies, without reading it, the exact content of
//! every file of a release the node has verified.
//!
//! When a tree is known to equal its manifest (a whole ship renamed into
//! place from bytes whose sha256 matched, or a delta tree that passed its
//! verification) the node records, per file, `path dev inode size mtime
//! ctime` (`find -printf '%P\t%D\t%i\t%s\t%T@\t%C@'`, nanoseconds) in
//! `.hangar/stamps/<id>`. A later delta that hard-links a file from that
//! release takes the manifest's sha256 for it when the file's stamp still
//! holds — a `stat`, not a read — and hashes only the files it received,
//! copied, or whose stamp no longer holds.
//!
//! Why a stamp that holds means the same bytes: every way to change a
//! file's content through the kernel — `write`, `truncate`, `mmap` writes,
//! `fallocate` hole punching — updates its ctime to the current time, and
//! no system call sets ctime to a chosen value (`utimensat` sets atime and
//! mtime, and itself bumps ctime). Replacing the file (a rename over it, an
//! editor's save-as-new) changes the inode; a copy of the tree has other
//! inodes; a filesystem moved to another device changes `dev`. Since an
//! in-place edit of a hard-linked file changes *every* release that shares
//! the inode, a stamp is per inode too, and it goes stale for all of them
//! at once. What is **not** caught, and is outside the guarantee: writes to
//! the raw block device or an unmounted filesystem (`debugfs`), a clock set
//! back to the instant of the recorded ctime, filesystems that do not
//! maintain ctime (some FUSE or network mounts), a change within the same
//! timestamp tick (the kernel's coarse clock, a few ms) as the recorded
//! one, and root forging the stamp file itself (who can also replace the
//! active release's files after activation). Anything else makes the node
//! hash the file, as it did before stamps existed.
//!
//! A link or unlink changes the inode's link count, and with it the ctime:
//! hard-linking a release into a new one, or removing an old release,
//! would make every sharing release's stamps stale. Operations that do so
//! bracket themselves with `stamp_hold` (which stamps still hold, before)
//! and `stamp_renew` (those, with the ctime the operation gave them,
//! after), both under the node's release lock; a stamp that did not hold
//! before is dropped, never renewed. If the script dies in between, the
//! stamps stay stale and the next delta hashes those files.

/// Shell functions every stamp-aware node script defines after the lock
/// prelude (needs `$root`).
pub(super) const FUNCTIONS: &str = r#"stamps="$root/.hangar/stamps"
stamp_list() { (cd "$1" && LC_ALL=C find . -type f -printf '%P\t%D\t%i\t%s\t%T@\t%C@\n'); }
stamp_record() {
  mkdir -p "$stamps" && stamp_list "$1" > "$stamps/$2.tmp" && mv -f "$stamps/$2.tmp" "$stamps/$2" \
    || { rm -f "$stamps/$2.tmp" "$stamps/$2"; return 1; }
}
stamp_hold() {
  rm -rf "$stamps.hold"
  [ -d "$stamps" ] || return 0
  mkdir -p "$stamps.hold" || return 1
  for f in "$stamps"/*; do
    [ -f "$f" ] || continue
    r=${f##*/}
    case "$r" in *.tmp) rm -f "$f"; continue ;; esac
    [ -d "$root/releases/$r" ] || { rm -f "$f"; continue; }
    stamp_list "$root/releases/$r" | LC_ALL=C awk -v s="$f" 'BEGIN { while ((getline l < s) > 0) ok[l] = 1 } $0 in ok' > "$stamps.hold/$r" || return 1
  done
}
stamp_renew() {
  [ -d "$stamps.hold" ] || return 0
  for h in "$stamps.hold"/*; do
    [ -f "$h" ] || continue
    r=${h##*/}
    if [ -d "$root/releases/$r" ] && [ -f "$stamps/$r" ]; then
      stamp_list "$root/releases/$r" | LC_ALL=C awk -F '\t' -v s="$h" '
        BEGIN { while ((getline l < s) > 0) { split(l, f, "\t"); ok[f[1] "\t" f[2] "\t" f[3] "\t" f[4] "\t" f[5]] = 1 } }
        ($1 "\t" $2 "\t" $3 "\t" $4 "\t" $5) in ok' > "$stamps/$r.tmp" && mv -f "$stamps/$r.tmp" "$stamps/$r" \
        || rm -f "$stamps/$r.tmp" "$stamps/$r"
    else
      rm -f "$stamps/$r"
    fi
  done
  rm -rf "$stamps.hold"
}
# A hold left by a script that died is never renewed: it is stale.
rm -rf "$stamps.hold"
"#;

/// From the stamps that held for `base` (`$stamps.hold/<base>`) and its
/// manifest, writes `work/known`: `dev ino size mtime sha256` of every
/// inode whose content is known without reading it. Needs `$base`, `$man`.
pub(super) fn known_snippet(work: &str) -> String {
    format!(
        r#"if [ -f "$stamps.hold/$base" ]; then
  LC_ALL=C awk -F '\t' -v man="$man/$base" 'BEGIN {{ while ((getline l < man) > 0) {{ split(l, f, "\t"); if (f[2] == "f") sha[f[1]] = f[6] }} }}
    ($1 in sha) {{ print $2 "\t" $3 "\t" $4 "\t" $5 "\t" sha[$1] }}' "$stamps.hold/$base" > {work}/known || : > {work}/known
else
  : > {work}/known
fi
"#
    )
}

/// Reads `list` (the verification's `find -printf` listing, fields
/// `path kind mode mtime size target dev ino ctime`) and the `known`
/// inodes: prints `sha256 *./path` into `sums` for a known file, and the
/// paths of the others (`./path`, one a line) to hash.
pub(super) const TRUST_AWK: &str = r#"
BEGIN { while ((getline l < known) > 0) { split(l, f, "\t"); sha[f[1] "\t" f[2] "\t" f[3] "\t" f[4]] = f[5] } }
$2 == "f" {
  k = $7 "\t" $8 "\t" $5 "\t" $4
  if (k in sha) print sha[k] " *./" $1 >> sums
  else print "./" $1
}
"#;

/// The stamps of a verified tree from its verification listing (`list`,
/// see [`TRUST_AWK`]), taken before any file was hashed: a change after
/// the listing either fails the hash or leaves the stamp stale.
pub(super) const FROM_LIST_AWK: &str =
    r#"$2 == "f" { print $1 "\t" $7 "\t" $8 "\t" $5 "\t" $4 "\t" $9 }"#;
