//! Delta ships: a node that already runs a release receives only what the
//! new one changes.
//!
//! From the new artifact's [`Manifest`] (as it will stand on this node)
//! and the manifest the node keeps for its current release, [`Plan::between`]
//! sorts every file into one of:
//!
//! - **link**: same path, same content and attributes → hard-linked from
//!   the previous release (`cp -al --parents`, one process for all);
//! - **rename**: the same content and attributes at another path → linked;
//! - **copy**: the same content, another mode or mtime → copied on the
//!   node (a link would change the previous release too), then `chmod`ed
//!   and `touch`ed;
//! - **send**: anything else, in a tar of the artifact's own members
//!   (headers and data byte for byte, so `tar` treats them exactly as in
//!   the full artifact), with every directory and symlink.
//!
//! Deletions need nothing: what the new manifest lacks is never linked.
//! The node then links `sharedPaths` as for a full ship and checks the
//! **whole** tree against the new manifest — every file's sha256 (hashed,
//! or for a linked file whose [`stamps`] entry still holds, taken from the
//! base's manifest without reading it), every mode, mtime, symlink target,
//! and no extra or missing entry — before it
//! renames `releases/<id>.tmp` into place. Any difference (a previous
//! release edited in place on the node, whose inode a link would share; a
//! damaged payload) aborts the delta and the release is shipped whole, so
//! a node never activates a tree that differs from the artifact. Hard
//! links are verified, never trusted: by content, or by a stat stamp
//! whose ctime changes with any write.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::manifest::{Kind, Manifest};
use super::plan::{self, ReleaseConfig};
use super::stamps;
use crate::effects::ssh::shell_quote;

/// Exit code of the delta script when the node cannot take a delta (its
/// base moved, a tool failed, the tree differs): ship in full instead.
pub const EXIT_NO_DELTA: u32 = 68;

/// A delta that would send more than this share of the release's bytes is
/// not worth its bookkeeping: the release is shipped whole.
const MAX_SENT_SHARE: f64 = 0.5;

/// A copy on the node: same content as `from` in the previous release,
/// with another mode or mtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyOp {
    pub from: String,
    pub to: String,
    pub mode: u32,
    pub mtime: String,
}

/// What a node does to turn its previous release into the new one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub links: Vec<String>,
    pub renames: Vec<(String, String)>,
    pub copies: Vec<CopyOp>,
    /// Archive members sent (by index): every directory and symlink, the
    /// files the previous release cannot provide, the archive's root.
    pub members: BTreeSet<usize>,
    pub files_sent: usize,
    pub bytes_sent: u64,
    /// File bytes the node takes from its previous release.
    pub bytes_reused: u64,
}

impl Plan {
    /// Diffs the manifest a node keeps for its release (`base`) against the
    /// new release as it will stand there (`new`, from
    /// [`Manifest::for_node`] of the artifact's manifest). `Err` says why a
    /// full ship is better.
    pub fn between(base: &Manifest, new: &Manifest) -> Result<Plan, String> {
        let mut by_content: HashMap<&str, Vec<&super::manifest::Entry>> = HashMap::new();
        for e in base.entries().iter().filter(|e| e.kind == Kind::File) {
            if let Some(sha) = e.sha256.as_deref() {
                by_content.entry(sha).or_default().push(e);
            }
        }
        let mut plan = Plan::default();
        plan.members.extend(new.root_member());
        for e in new.entries() {
            let Some(member) = e.member else {
                // Made on the node: an implicit directory, a shared-path link.
                continue;
            };
            match e.kind {
                Kind::Dir | Kind::Symlink => {
                    plan.members.insert(member);
                }
                Kind::File => {
                    if let Some(to) = &e.hardlink_to {
                        if new.get(to).is_none() {
                            return Err(format!(
                                "`{}` is a hard link into the shared path `{to}`",
                                e.path
                            ));
                        }
                    }
                    if base.get(&e.path).is_some_and(|b| b.same_inode_as(e)) {
                        plan.links.push(e.path.clone());
                        plan.bytes_reused += e.size;
                        continue;
                    }
                    let candidates = e
                        .sha256
                        .as_deref()
                        .and_then(|s| by_content.get(s))
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    if let Some(b) = candidates.iter().find(|b| b.same_inode_as(e)) {
                        plan.renames.push((b.path.clone(), e.path.clone()));
                        plan.bytes_reused += e.size;
                        continue;
                    }
                    let copyable = candidates
                        .iter()
                        .filter(|b| b.uid == e.uid && b.gid == e.gid)
                        .min_by_key(|b| b.path != e.path);
                    match (copyable, e.mode, e.mtime.as_ref()) {
                        (Some(b), Some(mode), Some(mtime)) => {
                            plan.copies.push(CopyOp {
                                from: b.path.clone(),
                                to: e.path.clone(),
                                mode,
                                mtime: mtime.clone(),
                            });
                            plan.bytes_reused += e.size;
                        }
                        _ => {
                            plan.members.insert(member);
                            plan.files_sent += 1;
                            plan.bytes_sent += e.size;
                        }
                    }
                }
            }
        }
        let total = new.file_bytes();
        if total > 0 && plan.bytes_sent as f64 > total as f64 * MAX_SENT_SHARE {
            return Err(format!("{} of {} bytes changed", plan.bytes_sent, total));
        }
        Ok(plan)
    }

    /// The plan as the node script reads it: `L path`, `R from to`,
    /// `C mode mtime from to`, tab-separated.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for p in &self.links {
            s.push_str(&format!("L\t{p}\n"));
        }
        for (from, to) in &self.renames {
            s.push_str(&format!("R\t{from}\t{to}\n"));
        }
        for c in &self.copies {
            s.push_str(&format!(
                "C\t{:o}\t{}\t{}\t{}\n",
                c.mode, c.mtime, c.from, c.to
            ));
        }
        s
    }

    pub fn files_reused(&self) -> usize {
        self.links.len() + self.renames.len() + self.copies.len()
    }
}

/// Everything one delta sends, the same for every node on the same base.
#[derive(Debug)]
pub struct Payload {
    /// Header line, gzip'd manifest, gzip'd plan, gzip'd tar of the members.
    pub stdin: Vec<u8>,
    pub plan: Plan,
}

/// Builds the payload: reads the artifact again for the members to send.
/// `manifest_gz` is the new manifest's text, gzip'd ([`gzip`]).
/// Blocking (file I/O and compression).
pub fn build_payload(artifact: &Path, manifest_gz: &[u8], plan: Plan) -> io::Result<Payload> {
    let plan_gz = gzip(plan.text().as_bytes(), 6)?;
    let file = std::fs::File::open(artifact)?;
    let gz = flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(256 * 1024, file));
    // Small payloads compress well at a high level; a large one (much of
    // the release changed) must not cost the operator seconds of CPU.
    let level = if plan.bytes_sent < 16 << 20 { 6 } else { 1 };
    let mut tar_gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    select_members(gz, &plan.members, &mut tar_gz)?;
    let tar_gz = tar_gz.finish()?;
    let mut stdin = format!(
        "hangar-delta 1 {} {} {}\n",
        manifest_gz.len(),
        plan_gz.len(),
        tar_gz.len()
    )
    .into_bytes();
    stdin.reserve(manifest_gz.len() + plan_gz.len() + tar_gz.len());
    stdin.extend_from_slice(manifest_gz);
    stdin.extend_from_slice(&plan_gz);
    stdin.extend_from_slice(&tar_gz);
    Ok(Payload { stdin, plan })
}

/// gzip at `level` (1 fast … 9 small).
pub fn gzip(bytes: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    gz.write_all(bytes)?;
    gz.finish()
}

/// Records what is read through it while `on`, and counts every byte.
struct Tape<R> {
    inner: R,
    state: Arc<Mutex<Recording>>,
}

#[derive(Default)]
struct Recording {
    on: bool,
    /// Absolute stream position of `bytes[0]`.
    start: u64,
    bytes: Vec<u8>,
    pos: u64,
}

impl<R: Read> Read for Tape<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.on {
            st.bytes.extend_from_slice(&buf[..n]);
        }
        st.pos += n as u64;
        Ok(n)
    }
}

const BLOCK: u64 = 512;

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Copies the chosen members of a tar stream, each with the extension
/// headers before it (pax, GNU long names), verbatim, then ends the archive.
pub fn select_members(
    reader: impl Read,
    members: &BTreeSet<usize>,
    out: &mut impl Write,
) -> io::Result<()> {
    let state = Arc::new(Mutex::new(Recording {
        on: true,
        ..Recording::default()
    }));
    let tape = Tape {
        inner: reader,
        state: state.clone(),
    };
    let mut archive = tar::Archive::new(tape);
    // Where the member being read began: the end of the previous one.
    let mut region_start = 0u64;
    let last = members.iter().next_back().copied();
    for (index, entry) in archive.entries()?.enumerate() {
        let mut entry = entry?;
        let data_start = entry.raw_file_position();
        let size = entry.size();
        let chosen = members.contains(&index);
        {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if st.pos != data_start || region_start < st.start {
                return Err(io::Error::other("tar stream positions do not add up"));
            }
            if chosen {
                let from = (region_start - st.start) as usize;
                out.write_all(&st.bytes[from..])?;
            }
            st.on = false;
            st.bytes.clear();
        }
        if chosen {
            let copied = io::copy(&mut (&mut entry).take(size), out)?;
            out.write_all(&vec![0u8; (padded(copied) - copied) as usize])?;
        } else {
            io::copy(&mut entry, &mut io::sink())?;
        }
        {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.on = true;
            st.start = st.pos;
        }
        region_start = data_start + padded(size);
        if Some(index) >= last {
            break;
        }
    }
    // End of archive: two zero blocks.
    out.write_all(&[0u8; 1024])?;
    Ok(())
}

/// The node side of a delta: takes the payload on stdin, builds
/// `releases/<id>.tmp/tree` from the previous release and the payload,
/// links shared paths, verifies the whole tree against the manifest,
/// renames it into place and keeps the manifest. Exits
/// [`EXIT_NO_DELTA`] (after cleaning up) when any of it fails.
pub fn delta_script(
    config: &ReleaseConfig,
    id: &str,
    artifact_sha: &str,
    base: &str,
    base_manifest_sha: &str,
    new_manifest_sha: &str,
    hasher: &str,
) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&plan::lock_prelude(config));
    s.push_str(stamps::FUNCTIONS);
    s.push_str(&format!(
        "id={id}\nwant={want}\nbase={base}\nbman={bman}\nnman={nman}\nhash={hash}\n",
        id = shell_quote(id),
        want = shell_quote(&artifact_sha.to_ascii_lowercase()),
        base = shell_quote(base),
        bman = shell_quote(base_manifest_sha),
        nman = shell_quote(new_manifest_sha),
        hash = shell_quote(plan::hash_command(hasher)),
    ));
    s.push_str(&format!(
        r#"rel="$root/releases/$id"
tmp="$rel.tmp"
src="$root/releases/$base"
art="$root/.hangar/artifacts/$id"
man="$root/.hangar/manifests"
tab=$(printf '\t')
if [ -d "$rel" ] && [ "$(cat "$art" 2>/dev/null)" = "$want" ]; then echo present; exit 0; fi
no() {{ cd /; rm -rf "$tmp"; stamp_renew; echo "delta: $*"; exit {EXIT_NO_DELTA}; }}
rm -rf "$tmp"
mkdir -p "$tmp/tree" || no "cannot create $tmp"
[ -d "$src" ] || no "release $base is gone"
[ "$($hash < "$man/$base" 2>/dev/null | cut -c1-64)" = "$bman" ] || no "the manifest of $base changed"
read -r magic version mlen plen tlen || no "no payload header"
[ "$magic $version" = "hangar-delta 1" ] || no "unknown payload format"
head -c "$mlen" > "$tmp/manifest.gz" && head -c "$plen" > "$tmp/plan.gz" || no "payload truncated"
gzip -dc < "$tmp/manifest.gz" > "$tmp/manifest" 2>/dev/null \
  && [ "$($hash < "$tmp/manifest" | cut -c1-64)" = "$nman" ] || no "manifest damaged in transit"
gzip -dc < "$tmp/plan.gz" > "$tmp/plan" 2>/dev/null || no "plan damaged in transit"
# Never link through a symlink the previous release's manifest does not know.
(cd "$src" && LC_ALL=C find . -mindepth 1 -type l -printf '%P\t%l\n') > "$tmp/base.links" || no "cannot list $base"
LC_ALL=C awk -F "$tab" 'FNR == NR {{ if ($2 == "l") want[$1] = $7; next }}
  !($1 in want) || want[$1] != $2 {{ print $1; exit 1 }}' "$man/$base" "$tmp/base.links" > "$tmp/odd" \
  || no "$base has a symlink its manifest does not list: $(cat "$tmp/odd")"
# Linking changes the ctime of the base's inodes: note which stamps hold
# now (those name content known without reading it), renew them after.
rm -f "$stamps/$id"
stamp_hold || no "cannot check the stamps of the kept releases"
{KNOWN}if grep -q "^L$tab" "$tmp/plan"; then
  awk -F "$tab" '$1 == "L" {{ print $2 }}' "$tmp/plan" | tr '\n' '\0' \
    | (cd "$src" && xargs -0 -r cp -al --parents -t "$tmp/tree" --) || no "linking from $base failed"
fi
if grep -q "^R$tab" "$tmp/plan"; then
  awk -F "$tab" '$1 == "R" {{ print $2 "\t" $3 }}' "$tmp/plan" | while IFS="$tab" read -r from to; do
    d=${{to%/*}}; [ "$d" = "$to" ] || mkdir -p "$tmp/tree/$d" || exit 1
    ln "$src/$from" "$tmp/tree/$to" || exit 1
  done || no "linking moved files failed"
fi
if grep -q "^C$tab" "$tmp/plan"; then
  awk -F "$tab" '$1 == "C" && $4 == $5 {{ print $5 }}' "$tmp/plan" | tr '\n' '\0' \
    | (cd "$src" && xargs -0 -r cp -p --reflink=auto --parents -t "$tmp/tree" --) || no "copying failed"
  awk -F "$tab" '$1 == "C" && $4 != $5 {{ print $4 "\t" $5 }}' "$tmp/plan" | while IFS="$tab" read -r from to; do
    d=${{to%/*}}; [ "$d" = "$to" ] || mkdir -p "$tmp/tree/$d" || exit 1
    cp -p --reflink=auto "$src/$from" "$tmp/tree/$to" || exit 1
  done || no "copying moved files failed"
  for m in $(awk -F "$tab" '$1 == "C" {{ print $2 }}' "$tmp/plan" | sort -u); do
    awk -F "$tab" -v m="$m" '$1 == "C" && $2 == m {{ print $5 }}' "$tmp/plan" | tr '\n' '\0' \
      | (cd "$tmp/tree" && xargs -0 -r chmod "$m" --) || no "chmod failed"
  done
  for t in $(awk -F "$tab" '$1 == "C" {{ print $3 }}' "$tmp/plan" | sort -u); do
    awk -F "$tab" -v t="$t" '$1 == "C" && $3 == t {{ print $5 }}' "$tmp/plan" | tr '\n' '\0' \
      | (cd "$tmp/tree" && xargs -0 -r touch -m -d "@$t" --) || no "touch failed"
  done
fi
tar -xzf - -C "$tmp/tree" 2>"$tmp/tar.err" || no "extracting the changes failed: $(tail -c 300 "$tmp/tar.err")"
"#,
        KNOWN = stamps::known_snippet("\"$tmp\""),
    ));
    s.push_str(&plan::link_shared_script(config, "$tmp/tree"));
    s.push_str(&verify_snippet("$tmp/tree", "$tmp/manifest", "$tmp"));
    s.push_str(
        &r#"if [ "$verified" != yes ]; then cat "$tmp/verify"; no "the tree differs from the manifest"; fi
hashed=$(wc -l < "$tmp/tohash")
cd /
if [ -e "$rel" ]; then mv -T "$rel" "$tmp/replaced" || exit 71; fi
mv -T "$tmp/tree" "$rel" || exit 71
mkdir -p "$man" "$root/.hangar/artifacts" && mv -f "$tmp/manifest" "$man/$id" \
  && printf '%s\n' "$want" > "$art.tmp" && mv -f "$art.tmp" "$art" || exit 72
mkdir -p "$stamps" && LC_ALL=C awk -F "$tab" 'STAMPS' "$tmp/list" > "$stamps/$id.tmp" \
  && mv -f "$stamps/$id.tmp" "$stamps/$id" || rm -f "$stamps/$id.tmp" "$stamps/$id"
rm -rf "$tmp"
stamp_renew
{ grep -vxF "$id" "$root/.hangar/shipped" 2>/dev/null; echo "$id"; } > "$root/.hangar/shipped.tmp" \
  && mv -f "$root/.hangar/shipped.tmp" "$root/.hangar/shipped" || exit 72
echo "hashed $hashed"
echo shipped
"#
        .replace("'STAMPS'", &format!("'{}'", stamps::FROM_LIST_AWK)),
    );
    s
}

/// Checks the tree at `tree` against the manifest at `manifest` (both
/// shell words); sets `verified=yes` or leaves the differences (at most
/// 20) in `<work>/verify`. Files whose inode `<work>/known` names (see
/// [`stamps`]) take its sha256; every other file is hashed. Needs `$hash`
/// and `$tab`.
fn verify_snippet(tree: &str, manifest: &str, work: &str) -> String {
    format!(
        r#"verified=no
: > {work}/sums
(cd {tree} && LC_ALL=C find . -mindepth 1 -printf '%P\t%y\t%m\t%T@\t%s\t%l\t%D\t%i\t%C@\n') > {work}/list \
  && LC_ALL=C awk -F "$tab" -v known={work}/known -v sums={work}/sums '{TRUST_AWK}' {work}/list > {work}/tohash \
  && (cd {tree} && tr '\n' '\0' < {work}/tohash | xargs -0 -r $hash) >> {work}/sums \
  && LC_ALL=C awk -F "$tab" -v list={work}/list -v sums={work}/sums '{VERIFY_AWK}' {manifest} > {work}/verify \
  && verified=yes
"#,
        TRUST_AWK = stamps::TRUST_AWK,
    )
}

/// Compares the manifest (its input) with the node's listing (`list`:
/// `find -printf`) and hashes (`sums`: `hex *./path` or `hex  ./path`).
const VERIFY_AWK: &str = r#"
BEGIN {
  while ((getline l < sums) > 0) sha[substr(l, 69)] = substr(l, 1, 64)
  while ((getline l < list) > 0) {
    split(l, f, "\t")
    if (f[2] == "f") { m = f[4]; sub(/\..*/, "", m); have[f[1]] = "f\t" f[3] "\t" m "\t" f[5] "\t" ((f[1] in sha) ? sha[f[1]] : "?") "\t-" }
    else if (f[2] == "d") have[f[1]] = "d\t" f[3] "\t-\t-\t-\t-"
    else if (f[2] == "l") have[f[1]] = "l\t-\t-\t-\t-\t" f[6]
    else have[f[1]] = f[2] "\t?\t?\t?\t?\t?"
  }
}
FNR == 1 { next }
{
  m = $4; sub(/\..*/, "", m)
  want = $2 "\t" $3 "\t" m "\t" $5 "\t" $6 "\t" $7
  seen[$1] = 1
  if (!($1 in have)) { bad++; if (bad <= 20) print "missing " $1; next }
  got = have[$1]
  if ($3 == "*") { split(got, g, "\t"); want = $2 "\t" g[2] "\t" m "\t" $5 "\t" $6 "\t" $7 }
  if (got != want) { bad++; if (bad <= 20) { gsub(/\t/, " ", got); gsub(/\t/, " ", want); print "differs " $1 ": " got " (want " want ")" } }
}
END {
  for (p in have) if (!(p in seen)) { bad++; if (bad <= 20) print "extra " p }
  exit (bad > 0 ? 1 : 0)
}
"#;

/// Prints the canonical listing of `dir` (what the node verifies: path,
/// kind, mode, whole-second mtime, size, sha256, target), sorted: equal
/// output means equal trees. For tests and benchmarks.
pub fn tree_listing_script(dir: &str) -> String {
    format!(
        r#"set -u
tab=$(printf '\t')
if command -v openssl >/dev/null 2>&1; then hash="openssl dgst -sha256 -r"; else hash=sha256sum; fi
w=$(mktemp -d) || exit 70
(cd {dir} && LC_ALL=C find . -mindepth 1 -printf '%P\t%y\t%m\t%T@\t%s\t%l\n') > "$w/list" \
  && (cd {dir} && LC_ALL=C find . -type f -print0 | xargs -0 -r $hash) > "$w/sums" || exit 70
LC_ALL=C awk -F "$tab" -v sums="$w/sums" '
BEGIN {{ while ((getline l < sums) > 0) sha[substr(l, 69)] = substr(l, 1, 64) }}
{{ if ($2 == "f") {{ m = $4; sub(/\..*/, "", m); print $1 " f " $3 " " m " " $5 " " sha[$1] }}
  else if ($2 == "l") print $1 " l " $6
  else print $1 " " $2 " " $3 }}' "$w/list" | LC_ALL=C sort
rm -rf "$w"
"#,
        dir = shell_quote(dir)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::release::manifest::{list_members, NodeView};
    use tar::EntryType as T;

    use crate::effects::release::test_tar::{self, Member};

    fn tar_of(members: &[Member]) -> Vec<u8> {
        test_tar::tar_of(members, 0)
    }

    fn view() -> NodeView {
        NodeView {
            app_root: "/srv/app".into(),
            shared_paths: vec!["storage".into()],
            umask: None,
        }
    }

    fn manifest(members: &[Member]) -> Manifest {
        list_members(&tar_of(members)[..])
            .unwrap()
            .unwrap()
            .for_node(&view())
    }

    const OLD: &[Member] = &[
        ("app/", T::Directory, 0o755, b"", None),
        ("app/same.php", T::Regular, 0o644, b"same", None),
        ("app/edit.php", T::Regular, 0o644, b"v1", None),
        ("app/gone.php", T::Regular, 0o644, b"bye", None),
        ("app/moved.php", T::Regular, 0o644, b"moving", None),
        ("app/chmod.sh", T::Regular, 0o644, b"#!/bin/sh", None),
        ("storage/", T::Directory, 0o755, b"", None),
        ("storage/seed", T::Regular, 0o644, b"seed", None),
        ("link", T::Symlink, 0o777, b"", Some("app")),
    ];

    const NEW: &[Member] = &[
        ("app/", T::Directory, 0o755, b"", None),
        ("app/same.php", T::Regular, 0o644, b"same", None),
        ("app/edit.php", T::Regular, 0o644, b"v2!", None),
        ("lib/", T::Directory, 0o755, b"", None),
        ("lib/moved.php", T::Regular, 0o644, b"moving", None),
        ("app/chmod.sh", T::Regular, 0o755, b"#!/bin/sh", None),
        ("app/new.php", T::Regular, 0o644, b"hello", None),
        ("empty/", T::Directory, 0o700, b"", None),
        ("storage/", T::Directory, 0o755, b"", None),
        ("storage/seed", T::Regular, 0o644, b"other seed", None),
        ("link", T::Symlink, 0o777, b"", Some("lib")),
    ];

    #[test]
    fn plan_links_unchanged_moves_renamed_copies_chmoded_sends_the_rest() {
        let (base, new) = (manifest(OLD), manifest(NEW));
        let plan = Plan::between(&base, &new).unwrap();
        assert_eq!(plan.links, vec!["app/same.php"]);
        assert_eq!(
            plan.renames,
            vec![("app/moved.php".to_string(), "lib/moved.php".to_string())]
        );
        assert_eq!(
            plan.copies,
            vec![CopyOp {
                from: "app/chmod.sh".into(),
                to: "app/chmod.sh".into(),
                mode: 0o755,
                mtime: "1704067200".into()
            }]
        );
        // app/, lib/, empty/, link, and the two changed files; the shared
        // path's members are the node's business.
        assert_eq!(plan.members, BTreeSet::from([0, 2, 3, 6, 7, 10]));
        assert_eq!((plan.files_sent, plan.bytes_sent), (2, 3 + 5));
        assert_eq!(plan.files_reused(), 3);
        assert_eq!(
            plan.text(),
            "L\tapp/same.php\nR\tapp/moved.php\tlib/moved.php\nC\t755\t1704067200\tapp/chmod.sh\tapp/chmod.sh\n"
        );
    }

    #[test]
    fn a_release_that_mostly_changed_is_shipped_whole() {
        let base = manifest(&[("a", T::Regular, 0o644, b"old content", None)]);
        let new = manifest(&[("a", T::Regular, 0o644, b"new content", None)]);
        let err = Plan::between(&base, &new).unwrap_err();
        assert!(err.contains("bytes changed"), "{err}");
    }

    #[test]
    fn selected_members_are_copied_verbatim_with_their_extension_headers() {
        let long = format!("{}/file.txt", "d".repeat(150));
        let members: Vec<Member> = vec![
            ("a.txt", T::Regular, 0o644, b"aaa", None),
            (long.as_str(), T::Regular, 0o600, b"long name", None),
            ("b.txt", T::Regular, 0o644, &[7u8; 1000][..], None),
            ("c", T::Symlink, 0o777, b"", Some("a.txt")),
        ];
        let tar = tar_of(&members);
        let mut out = Vec::new();
        select_members(&tar[..], &BTreeSet::from([1, 3]), &mut out).unwrap();
        let mut got = tar::Archive::new(&out[..]);
        let names: Vec<(String, Vec<u8>)> = got
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect();
        assert_eq!(
            names,
            vec![(long.clone(), b"long name".to_vec()), ("c".into(), vec![])]
        );
        // Byte for byte: the long name's `L` header, the name, the header
        // (a.txt's header and data block come first in the original).
        assert_eq!(&out[..512 * 3], &tar[1024..1024 + 512 * 3]);
    }

    #[test]
    fn the_delta_script_verifies_before_renaming() {
        let s = delta_script(
            &ReleaseConfig::new("/srv/app"),
            "r2",
            &"a".repeat(64),
            "r1",
            &"b".repeat(64),
            &"c".repeat(64),
            "openssl",
        );
        let verify = s.find("if [ \"$verified\" != yes ]").unwrap();
        let rename = s.find("mv -T \"$tmp/tree\" \"$rel\"").unwrap();
        let extract = s.find("tar -xzf -").unwrap();
        assert!(extract < verify && verify < rename, "{s}");
        // Stamps are checked before linking changes the base's ctimes, and
        // renewed once the new release is in place.
        let hold = s.find("stamp_hold ||").unwrap();
        let link = s.find("cp -al").unwrap();
        let renew = s.rfind("stamp_renew\n").unwrap();
        assert!(hold < link && rename < renew, "{s}");
        assert!(s.contains("hash='openssl dgst -sha256 -r'"), "{s}");
    }
}
