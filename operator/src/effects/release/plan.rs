//! The pure half of release shipping: validation, the remote scripts, and
//! reading what a node reports. No I/O here.

use sha2::{Digest, Sha256};

use super::ReleaseError;
use crate::effects::ssh::shell_quote;

/// Exit codes the ship and swap scripts use to say what went wrong.
pub const EXIT_EXTRACT: u32 = 66;
pub const EXIT_NOT_SHIPPED: u32 = 67;
pub const EXIT_LOCKED: u32 = 75;

/// How long a release operation waits for another one on the same node
/// (an orphaned upload of a dropped connection finishes within seconds).
const LOCK_WAIT_SECS: u32 = 120;

/// The parts of `spec.release` that shipping needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseConfig {
    pub app_root: String,
    pub shared_paths: Vec<String>,
    pub keep: u32,
    pub before_activate: Vec<String>,
    pub after_activate: Vec<String>,
}

impl ReleaseConfig {
    pub fn from_spec(release: &hangar_crds::Release) -> Result<Self, ReleaseError> {
        let config = ReleaseConfig {
            app_root: release.app_root.clone(),
            shared_paths: release.shared_paths.clone(),
            keep: release.keep,
            before_activate: release.hooks.before_activate.clone(),
            after_activate: release.hooks.after_activate.clone(),
        };
        config.validate()?;
        Ok(config)
    }

    /// A config with the spec's defaults (keep 5, no hooks, no shared paths).
    pub fn new(app_root: impl Into<String>) -> Self {
        ReleaseConfig {
            app_root: app_root.into(),
            shared_paths: Vec::new(),
            keep: 5,
            before_activate: Vec::new(),
            after_activate: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), ReleaseError> {
        let root = &self.app_root;
        if !root.starts_with('/') || root == "/" || root.split('/').any(|c| c == "..") {
            return Err(ReleaseError::Invalid(format!(
                "appRoot `{root}` must be an absolute path below /"
            )));
        }
        for p in &self.shared_paths {
            let bad = p.is_empty()
                || p.starts_with('/')
                || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
            if bad {
                return Err(ReleaseError::Invalid(format!(
                    "sharedPaths entry `{p}` must be a relative path without `.`/`..` segments"
                )));
            }
        }
        if self.keep < 2 {
            return Err(ReleaseError::Invalid(format!(
                "keep is {}: at least 2 (the active and the previous release)",
                self.keep
            )));
        }
        Ok(())
    }

    /// Release ids name directories: letters, digits, `.`, `_`, `-`.
    pub fn validate_id(&self, id: &str) -> Result<(), ReleaseError> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && !id.ends_with(".tmp")
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(())
        } else {
            Err(ReleaseError::Invalid(format!(
                "release id `{id}` must be letters, digits, `.`, `_`, `-` (not starting with `.`, not ending in `.tmp`)"
            )))
        }
    }

    fn root_q(&self) -> String {
        shell_quote(&self.app_root)
    }
}

pub fn validate_sha256(sha: &str) -> Result<(), ReleaseError> {
    if sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ReleaseError::Invalid(format!(
            "sha256 `{sha}` is not 64 hex digits"
        )))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Takes the node's release lock (fd 9) for the rest of the script.
pub(super) fn lock_prelude(config: &ReleaseConfig) -> String {
    format!(
        "root={root}\nmkdir -p \"$root/releases\" \"$root/shared\" \"$root/.hangar\" || exit 70\n\
         exec 9>>\"$root/.hangar/lock\"\n\
         flock -w {LOCK_WAIT_SECS} 9 || {{ echo 'another release operation holds the node lock' >&2; exit {EXIT_LOCKED}; }}\n",
        root = config.root_q()
    )
}

/// Prints `present` when `releases/<id>` is complete and came from the
/// artifact with `sha256` (recorded in `.hangar/artifacts/<id>` when it was
/// shipped: an id is a name, and a republished one is shipped again).
/// Otherwise `absent`, then what a delta ship needs to know (see
/// [`parse_probe`]): the release `current` points to and the sha256 of the
/// manifest kept for it, the login's uid and umask, which sha256 tool and
/// whether the GNU tools a delta uses are there, and which shared paths do
/// not exist yet.
pub fn probe_script(config: &ReleaseConfig, id: &str, sha256: &str) -> String {
    let mut s = format!(
        r#"root={root}
if command -v openssl >/dev/null 2>&1; then h=openssl; elif command -v sha256sum >/dev/null 2>&1; then h=sha256sum; else h=; fi
echo "hasher=$h"
echo "uid=$(id -u)"
echo "umask=$(umask)"
if [ -d "$root/releases/"{id} ] && [ "$(cat "$root/.hangar/artifacts/"{id} 2>/dev/null)" = {want} ]; then
  echo present
  [ -f "$root/.hangar/manifests/"{id} ] || echo unkept
  exit 0
fi
echo absent
base=$(readlink "$root/current" 2>/dev/null || true)
base=${{base##*/}}
m="$root/.hangar/manifests/$base"
[ -n "$base" ] && [ -n "$h" ] && [ -d "$root/releases/$base" ] && [ -f "$m" ] || exit 0
echo "base=$base"
if [ "$h" = openssl ]; then echo "base_manifest=$(openssl dgst -sha256 -r < "$m" | cut -c1-64)"
else echo "base_manifest=$(sha256sum < "$m" | cut -c1-64)"; fi
tools=ok
find / -maxdepth 0 -printf '' 2>/dev/null || tools="no GNU find"
cp --version 2>/dev/null | grep -q GNU || tools="no GNU cp"
for t in awk xargs gzip head tr grep sort; do command -v $t >/dev/null 2>&1 || tools="no $t"; done
echo "tools=$tools"
"#,
        root = config.root_q(),
        id = shell_quote(id),
        want = shell_quote(&sha256.to_ascii_lowercase()),
    );
    for p in &config.shared_paths {
        s.push_str(&format!(
            "[ -e \"$root/shared/\"{p} ] || [ -L \"$root/shared/\"{p} ] || echo shared_missing={p}\n",
            p = shell_quote(p)
        ));
    }
    s.push_str("true\n");
    s
}

/// What [`probe_script`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The release is complete from this very artifact.
    pub present: bool,
    /// It is, but its manifest is not kept (shipped by an older hangar, or
    /// a crash came between the ship and keeping it).
    pub unkept: bool,
    /// `openssl` or `sha256sum`.
    pub hasher: Option<String>,
    pub uid: Option<u32>,
    pub umask: Option<u32>,
    /// `Err(what is missing)` when the node lacks a tool a delta uses.
    pub tools: Result<(), String>,
    pub shared_missing: Vec<String>,
    /// The release `current` points to, with the sha256 of its manifest.
    pub base: Option<(String, String)>,
}

pub fn parse_probe(out: &str) -> Probe {
    let mut p = Probe {
        present: false,
        unkept: false,
        hasher: None,
        uid: None,
        umask: None,
        tools: Err("not probed".into()),
        shared_missing: Vec::new(),
        base: None,
    };
    let mut base = None;
    let mut base_manifest = None;
    for line in out.lines() {
        let line = line.trim_end();
        match line {
            "present" => p.present = true,
            "unkept" => p.unkept = true,
            _ => {}
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "hasher" if !v.is_empty() => p.hasher = Some(v.to_string()),
            "uid" => p.uid = v.parse().ok(),
            "umask" => p.umask = u32::from_str_radix(v, 8).ok(),
            "tools" => {
                p.tools = if v == "ok" {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            }
            "shared_missing" => p.shared_missing.push(v.to_string()),
            "base" if !v.is_empty() => base = Some(v.to_string()),
            "base_manifest" if v.len() == 64 => base_manifest = Some(v.to_string()),
            _ => {}
        }
    }
    p.base = base.zip(base_manifest);
    p
}

/// The command a node hashes with (`hasher` as [`Probe::hasher`] names it).
pub fn hash_command(hasher: &str) -> &'static str {
    if hasher == "openssl" {
        "openssl dgst -sha256 -r"
    } else {
        "sha256sum"
    }
}

/// Keeps the manifest (gzip'd on stdin) of a release shipped whole as
/// `.hangar/manifests/<id>`, if `releases/<id>` still came from that
/// artifact; checks what arrived against `manifest_sha`.
pub fn store_manifest_script(
    config: &ReleaseConfig,
    id: &str,
    artifact_sha: &str,
    manifest_sha: &str,
    hasher: &str,
) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(&format!(
        r#"id={id}
want={want}
hash={hash}
m="$root/.hangar/manifests/$id"
if ! [ -d "$root/releases/$id" ] || [ "$(cat "$root/.hangar/artifacts/$id" 2>/dev/null)" != "$want" ]; then
  echo "release $id is not the one shipped from this artifact" >&2; exit {EXIT_NOT_SHIPPED}
fi
mkdir -p "$root/.hangar/manifests" && gzip -dc > "$m.tmp" \
  && [ "$($hash < "$m.tmp" | cut -c1-64)" = {sha} ] && mv -f "$m.tmp" "$m" || {{ rm -f "$m.tmp"; exit 72; }}
"#,
        id = shell_quote(id),
        want = shell_quote(&artifact_sha.to_ascii_lowercase()),
        hash = shell_quote(hash_command(hasher)),
        sha = shell_quote(manifest_sha),
    ));
    s
}

/// Prints (gzip'd) the manifest kept for release `id`.
pub fn read_manifest_script(config: &ReleaseConfig, id: &str) -> String {
    format!(
        "gzip -c < {root}/.hangar/manifests/{id}",
        root = config.root_q(),
        id = shell_quote(id)
    )
}

/// Extracts the tarball on stdin into `releases/<id>.tmp/tree` and links
/// shared paths: the node's side of a whole ship is just `tar -xzf -`.
/// Nothing here is activatable: the operator, which hashed every byte as it
/// sent it (SSH's authenticated encryption delivers them unaltered and in
/// order), renames it into place with [`commit_script`] only when the
/// sha256 matched and this script exited 0 (`tar` read the whole stream).
/// `token` marks the staging directory as this operator's.
pub fn ship_script(config: &ReleaseConfig, id: &str, sha256: &str, token: &str) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(&format!(
        "id={id}\nwant={want}\ntoken={token}\nrel=\"$root/releases/$id\"\ntmp=\"$rel.tmp\"\n",
        id = shell_quote(id),
        want = shell_quote(&sha256.to_ascii_lowercase()),
        token = shell_quote(token),
    ));
    s.push_str(&format!(
        r#"art="$root/.hangar/artifacts/$id"
if [ -d "$rel" ] && [ "$(cat "$art" 2>/dev/null)" = "$want" ]; then echo present; exit 0; fi
rm -rf "$tmp"
mkdir -p "$tmp/tree" || exit 70
if ! tar -xzf - -C "$tmp/tree" 2>"$tmp/tar.err"; then
  cat "$tmp/tar.err" >&2
  rm -rf "$tmp"
  exit {EXIT_EXTRACT}
fi
"#
    ));
    s.push_str(&link_shared_script(config, "$tmp/tree"));
    s.push_str("printf '%s\\n' \"$token\" > \"$tmp/token\" || exit 72\necho extracted\n");
    s
}

/// Renames the tree [`ship_script`] staged (with `token`) to
/// `releases/<id>`, records its artifact, keeps its manifest (gzip'd on
/// stdin, checked against `manifest_sha`; none when empty) and the ship order.
pub fn commit_script(
    config: &ReleaseConfig,
    id: &str,
    sha256: &str,
    token: &str,
    manifest: Option<(&str, &str)>,
) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(super::stamps::FUNCTIONS);
    let (msha, hash) = manifest.unwrap_or(("", "sha256sum"));
    s.push_str(&format!(
        "id={id}\nwant={want}\ntoken={token}\nmsha={msha}\nhash={hash}\n",
        id = shell_quote(id),
        want = shell_quote(&sha256.to_ascii_lowercase()),
        token = shell_quote(token),
        msha = shell_quote(msha),
        hash = shell_quote(hash_command(hash)),
    ));
    s.push_str(&format!(
        r#"rel="$root/releases/$id"
tmp="$rel.tmp"
art="$root/.hangar/artifacts/$id"
man="$root/.hangar/manifests"
[ "$(cat "$tmp/token" 2>/dev/null)" = "$token" ] || {{ echo "releases/$id.tmp is not what this ship staged" >&2; exit {EXIT_NOT_SHIPPED}; }}
# A release of this id from another artifact is replaced (the node is
# out of service while it ships; the activation that follows runs hooks).
if [ -e "$rel" ]; then mv -T "$rel" "$tmp/replaced" || exit 71; fi
rm -f "$man/$id" "$stamps/$id"
mv -T "$tmp/tree" "$rel" || exit 71
# Extracted from bytes whose sha256 matched: the tree is the artifact's.
stamp_record "$rel" "$id"
mkdir -p "$root/.hangar/artifacts" && printf '%s\n' "$want" > "$art.tmp" && mv -f "$art.tmp" "$art" || exit 72
if [ -n "$msha" ]; then
  mkdir -p "$man" && gzip -dc > "$man/$id.tmp" 2>/dev/null \
    && [ "$($hash < "$man/$id.tmp" | cut -c1-64)" = "$msha" ] && mv -f "$man/$id.tmp" "$man/$id" || rm -f "$man/$id.tmp"
fi
rm -rf "$tmp"
{{ grep -vxF "$id" "$root/.hangar/shipped" 2>/dev/null; echo "$id"; }} > "$root/.hangar/shipped.tmp" \
  && mv -f "$root/.hangar/shipped.tmp" "$root/.hangar/shipped" || exit 72
echo shipped
"#
    ));
    s
}

/// Removes what [`ship_script`] staged with `token` (the artifact did not
/// hash to its sha256).
pub fn abort_script(config: &ReleaseConfig, id: &str, token: &str) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(&format!(
        "tmp=\"$root/releases/\"{id}.tmp\n[ \"$(cat \"$tmp/token\" 2>/dev/null)\" = {token} ] && rm -rf \"$tmp\"\ntrue\n",
        id = shell_quote(id),
        token = shell_quote(token),
    ));
    s
}

/// Replaces each shared path in `tree` by a link into `shared/`. The first
/// release seeds `shared/<path>` from its own copy (or an empty directory);
/// later releases never overwrite what `shared/` holds.
pub(super) fn link_shared_script(config: &ReleaseConfig, tree: &str) -> String {
    let mut s = String::new();
    for p in &config.shared_paths {
        let p = shell_quote(p);
        s.push_str(&format!(
            r#"p={p}
if [ ! -e "$root/shared/$p" ] && [ ! -L "$root/shared/$p" ]; then
  mkdir -p "$(dirname "$root/shared/$p")"
  if [ -e "{tree}/$p" ]; then cp -a "{tree}/$p" "$root/shared/$p"; else mkdir -p "$root/shared/$p"; fi
fi
rm -rf "{tree}/$p" && mkdir -p "$(dirname "{tree}/$p")" && ln -s "$root/shared/$p" "{tree}/$p" || exit 73
"#
        ));
    }
    s
}

/// Points `current` at `releases/<id>` atomically and records active and
/// previous in `.hangar/state` (after the swap; [`parse_state`] tolerates a
/// crash in between). With `unless_active`, a node already on `id` is left
/// alone. Prints what [`parse_swap`] reads: `swapped=<old>` or `already`,
/// then the node's state after it, so the activation needs no second look.
pub fn swap_script(config: &ReleaseConfig, id: &str, unless_active: bool) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(&format!("id={}\n", shell_quote(id)));
    s.push_str(&format!(
        r#"rel="$root/releases/$id"
[ -d "$rel" ] || {{ echo "release $id is not shipped" >&2; exit {EXIT_NOT_SHIPPED}; }}
old=$(readlink "$root/current" 2>/dev/null || true)
old=${{old##*/}}
if {unless_active} && [ "$old" = "$id" ]; then
  echo already
else
  prev=$old
  if [ "$old" = "$id" ] && [ -f "$root/.hangar/state" ]; then
    while IFS= read -r l || [ -n "$l" ]; do
      case $l in previous=*) prev=${{l#previous=}} ;; esac
    done < "$root/.hangar/state"
  fi
  ln -sfn "$rel" "$root/current.hangar-tmp" && mv -T "$root/current.hangar-tmp" "$root/current" || exit 74
  printf 'active=%s\nprevious=%s\n' "$id" "$prev" > "$root/.hangar/state.tmp" \
    && mv -f "$root/.hangar/state.tmp" "$root/.hangar/state" || exit 74
  printf 'swapped=%s\n' "$old"
fi
cur=$rel
"#
    ));
    s.push_str(STATE_LINES);
    s
}

/// What a swap did, and the node's state after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Swapped {
    /// `false` when the release was active already (`unless_active`).
    pub swapped: bool,
    /// The release `current` pointed to before the swap.
    pub replaced: Option<String>,
    pub state: NodeReleases,
}

/// Reads [`swap_script`]'s output.
pub fn parse_swap(out: &str) -> Swapped {
    let mut swapped = false;
    let mut replaced = None;
    for line in out.lines() {
        if let Some(old) = line.strip_prefix("swapped=") {
            swapped = true;
            replaced = (!old.is_empty()).then(|| old.to_string());
        }
    }
    Swapped {
        swapped,
        replaced,
        state: parse_state(out),
    }
}

/// Runs a hook in the release directory with the release's facts in the
/// environment.
pub fn hook_script(config: &ReleaseConfig, id: &str, hook: &str) -> String {
    format!(
        "cd {root}/releases/{id} && export APP_ROOT={root} RELEASE_ID={id} \
         RELEASE_PATH={root}/releases/{id} SHARED_PATH={root}/shared && sh -c {hook}",
        root = config.root_q(),
        id = shell_quote(id),
        hook = shell_quote(hook),
    )
}

/// Starts the release's `once` hooks on the node unless they ran or run:
/// prints `done <exit status>` (a run ended: its status is kept in
/// `.hangar/once/<id>.exit`), `running` (another run holds
/// `.hangar/once/<id>.lock`) or `started`. The run is detached from the SSH
/// session (`setsid`) and keeps the lock's file description — so the lock
/// — until its last hook ended: a dropped connection or an operator crash
/// neither kills it nor lets a second run start.
pub fn once_start_script(config: &ReleaseConfig, id: &str, hooks: &[String]) -> String {
    // The detached run: `$1` is the once directory, `$2` the release id.
    let mut inner = String::from("d=$1; id=$2\n(\n");
    for hook in hooks {
        inner.push_str(&format!("  sh -c {} || exit $?\n", shell_quote(hook)));
    }
    inner.push_str(
        ")\ns=$?\nprintf '%s\\n' \"$s\" > \"$d/$id.exit.tmp\" && mv -f \"$d/$id.exit.tmp\" \"$d/$id.exit\"\n",
    );
    format!(
        r#"set -u
root={root}
id={id}
rel="$root/releases/$id"
d="$root/.hangar/once"
mkdir -p "$d" || exit 70
[ -d "$rel" ] || {{ echo "release $id is not shipped" >&2; exit {EXIT_NOT_SHIPPED}; }}
exec 8>>"$d/$id.lock" || exit 70
flock -n 8 || {{ echo running; exit 0; }}
# Under the lock: a run that ended a moment ago left its result.
if [ -f "$d/$id.exit" ]; then echo "done $(cat "$d/$id.exit")"; exit 0; fi
cd "$rel" || exit 70
export APP_ROOT="$root" RELEASE_ID="$id" RELEASE_PATH="$rel" SHARED_PATH="$root/shared"
setsid sh -c {inner} once-hooks "$d" "$id" > "$d/$id.log" 2>&1 < /dev/null &
exec 8>&-
echo started
"#,
        root = config.root_q(),
        id = shell_quote(id),
        inner = shell_quote(&inner),
    )
}

/// Prints `done <status>`, `running`, or `absent` (no result and nobody
/// holds the lock: the run ended without one — the node restarted?).
pub fn once_status_script(config: &ReleaseConfig, id: &str) -> String {
    format!(
        r#"d={root}/.hangar/once
id={id}
if [ -f "$d/$id.exit" ]; then echo "done $(cat "$d/$id.exit")"; exit 0; fi
exec 8>>"$d/$id.lock" || exit 70
flock -n 8 || {{ echo running; exit 0; }}
# Under the lock: the run may have ended between the two looks.
if [ -f "$d/$id.exit" ]; then echo "done $(cat "$d/$id.exit")"; else echo absent; fi
"#,
        root = config.root_q(),
        id = shell_quote(id),
    )
}

/// The end of a once run's log, for an error message.
pub fn once_log_script(config: &ReleaseConfig, id: &str) -> String {
    format!(
        "tail -c 2000 {root}/.hangar/once/{id}.log 2>/dev/null || true",
        root = config.root_q(),
        id = shell_quote(id),
    )
}

/// Removes the given releases, re-checking under the lock that none is
/// what `current` points to.
pub fn prune_script(config: &ReleaseConfig, victims: &[String]) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(super::stamps::FUNCTIONS);
    // Unlinking a release changes the ctime of the inodes it shares with
    // the kept ones: their stamps are renewed if they held before.
    s.push_str("cur=$(readlink \"$root/current\" 2>/dev/null || true)\nstamp_hold || rm -rf \"$stamps\" \"$stamps.hold\"\n");
    for v in victims {
        s.push_str(&format!(
            "v={v}\n[ \"$cur\" = \"$root/releases/$v\" ] || rm -rf \"$root/releases/$v\" \"$root/.hangar/artifacts/$v\" \"$root/.hangar/manifests/$v\" \"$stamps/$v\"\n",
            v = shell_quote(v)
        ));
    }
    s.push_str("stamp_renew\n");
    s.push_str(
        "ids=$(ls -1 \"$root/releases\")\n\
         grep -xF \"$ids\" \"$root/.hangar/shipped\" > \"$root/.hangar/shipped.tmp\" 2>/dev/null; \
         mv -f \"$root/.hangar/shipped.tmp\" \"$root/.hangar/shipped\"\n",
    );
    s
}

/// Prints what [`parse_state`] reads: `current`, the state file, the ship
/// order and the directories under `releases/`.
pub fn state_script(config: &ReleaseConfig) -> String {
    format!(
        "root={root}\ncur=$(readlink \"$root/current\" 2>/dev/null || true)\n{STATE_LINES}",
        root = config.root_q()
    )
}

/// The body of [`state_script`], given `$root` and `$cur` (where `current`
/// points). Shell builtins only: it ends every swap too.
const STATE_LINES: &str = r#"printf 'current=%s\n' "$cur"
if [ -f "$root/.hangar/state" ]; then
  while IFS= read -r l || [ -n "$l" ]; do printf 'state.%s\n' "$l"; done < "$root/.hangar/state"
fi
if [ -f "$root/.hangar/shipped" ]; then
  while IFS= read -r l || [ -n "$l" ]; do printf 'shipped=%s\n' "$l"; done < "$root/.hangar/shipped"
fi
if [ -d "$root/releases" ]; then
  for d in "$root"/releases/*; do [ -d "$d" ] && printf 'dir=%s\n' "${d##*/}"; done
fi
true
"#;

/// Writes stdin to `shared/.env` (0600, atomically) unless it already has
/// `sha`; prints `changed` or `unchanged`.
pub fn env_file_script(config: &ReleaseConfig, sha: &str) -> String {
    format!(
        r#"set -e
f={root}/shared/.env
mkdir -p {root}/shared
if [ -f "$f" ] && [ "$(sha256sum < "$f" | cut -c1-64)" = {sha} ] && [ "$(stat -c %a "$f")" = 600 ]; then
  cat >/dev/null
  echo unchanged
  exit 0
fi
umask 077
cat > "$f.hangar-tmp"
chmod 600 "$f.hangar-tmp"
mv -f "$f.hangar-tmp" "$f"
echo changed
"#,
        root = config.root_q(),
        sha = shell_quote(sha)
    )
}

/// What a node says about its releases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReleases {
    /// Where `current` points (its directory name).
    pub active: Option<String>,
    /// The release active before it: the rollback target.
    pub previous: Option<String>,
    /// Complete releases, oldest first (ship order; unknown ones first, by name).
    pub releases: Vec<String>,
    /// Leftover `<id>.tmp` staging directories (a dropped upload).
    pub staging: Vec<String>,
}

/// Reads [`state_script`]'s output. `current` is the truth for the active
/// release; if the state file lags behind it (a crash between the swap and
/// the state write), the state's `active` is the previous release.
pub fn parse_state(out: &str) -> NodeReleases {
    let mut current = None;
    let mut st_active = None;
    let mut st_previous = None;
    let mut shipped: Vec<String> = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    for line in out.lines() {
        let nonempty = |v: &str| (!v.is_empty()).then(|| v.to_string());
        if let Some(v) = line.strip_prefix("current=") {
            current = nonempty(v.rsplit('/').next().unwrap_or(""));
        } else if let Some(v) = line.strip_prefix("state.active=") {
            st_active = nonempty(v);
        } else if let Some(v) = line.strip_prefix("state.previous=") {
            st_previous = nonempty(v);
        } else if let Some(v) = line.strip_prefix("shipped=") {
            if !v.is_empty() {
                shipped.push(v.to_string());
            }
        } else if let Some(v) = line.strip_prefix("dir=") {
            dirs.push(v.to_string());
        }
    }
    let previous = if st_active.is_some() && st_active == current {
        st_previous
    } else {
        st_active
    };
    let (staging, complete): (Vec<String>, Vec<String>) =
        dirs.into_iter().partition(|d| d.ends_with(".tmp"));
    let mut unknown: Vec<String> = complete
        .iter()
        .filter(|d| !shipped.contains(d))
        .cloned()
        .collect();
    unknown.sort();
    let mut releases = unknown;
    releases.extend(shipped.into_iter().filter(|s| complete.contains(s)));
    NodeReleases {
        active: current,
        previous,
        releases,
        staging: staging
            .into_iter()
            .map(|s| s.trim_end_matches(".tmp").to_string())
            .collect(),
    }
}

/// Which releases to delete so at most `keep` remain: the oldest first,
/// never the active or the previous one.
pub fn prune_victims(state: &NodeReleases, keep: u32) -> Vec<String> {
    let keep = keep.max(2) as usize;
    let excess = state.releases.len().saturating_sub(keep);
    state
        .releases
        .iter()
        .filter(|r| Some(*r) != state.active.as_ref() && Some(*r) != state.previous.as_ref())
        .take(excess)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ReleaseConfig {
        ReleaseConfig {
            shared_paths: vec!["storage/logs".into()],
            ..ReleaseConfig::new("/srv/app")
        }
    }

    fn state(releases: &[&str], active: Option<&str>, previous: Option<&str>) -> NodeReleases {
        NodeReleases {
            active: active.map(String::from),
            previous: previous.map(String::from),
            releases: releases.iter().map(|s| s.to_string()).collect(),
            staging: vec![],
        }
    }

    #[test]
    fn prune_keeps_newest_and_never_active_or_previous() {
        let s = state(&["r1", "r2", "r3", "r4", "r5"], Some("r5"), Some("r4"));
        assert_eq!(prune_victims(&s, 3), vec!["r1", "r2"]);
        // After rolling back to an old release, it and the one rolled back
        // from survive even though they are old/new.
        let s = state(&["r1", "r2", "r3", "r4", "r5"], Some("r1"), Some("r5"));
        assert_eq!(prune_victims(&s, 3), vec!["r2", "r3"]);
        assert!(prune_victims(&state(&["r1", "r2"], Some("r2"), Some("r1")), 2).is_empty());
        // keep below 2 is treated as 2.
        let s = state(&["r1", "r2", "r3"], Some("r3"), Some("r2"));
        assert_eq!(prune_victims(&s, 0), vec!["r1"]);
    }

    #[test]
    fn state_reads_current_state_file_and_order() {
        let out = "current=/srv/app/releases/b\nstate.active=b\nstate.previous=a\n\
                   shipped=a\nshipped=b\nshipped=gone\ndir=a\ndir=b\ndir=c.tmp\ndir=zz\n";
        let s = parse_state(out);
        assert_eq!(s.active.as_deref(), Some("b"));
        assert_eq!(s.previous.as_deref(), Some("a"));
        assert_eq!(s.releases, vec!["zz", "a", "b"]);
        assert_eq!(s.staging, vec!["c"]);
    }

    #[test]
    fn a_crash_between_swap_and_state_write_still_knows_previous() {
        let out =
            "current=/srv/app/releases/c\nstate.active=b\nstate.previous=a\ndir=a\ndir=b\ndir=c\n";
        let s = parse_state(out);
        assert_eq!(s.active.as_deref(), Some("c"));
        assert_eq!(s.previous.as_deref(), Some("b"));
    }

    #[test]
    fn a_fresh_node_has_nothing() {
        let s = parse_state("current=\n");
        assert_eq!(s, NodeReleases::default());
    }

    #[test]
    fn ids_and_paths_are_validated() {
        let c = cfg();
        for bad in ["", ".hidden", "a/b", "x.tmp", "a b", "$(x)"] {
            assert!(c.validate_id(bad).is_err(), "{bad}");
        }
        assert!(c.validate_id("3f2a9c1").is_ok());
        assert!(c.validate_id("v1.2.3_build-7").is_ok());
        for bad in ["../x", "/abs", "a//b", "a/./b", ""] {
            let c = ReleaseConfig {
                shared_paths: vec![bad.into()],
                ..cfg()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(ReleaseConfig::new("relative").validate().is_err());
        assert!(ReleaseConfig::new("/").validate().is_err());
        assert!(validate_sha256(&"a".repeat(64)).is_ok());
        assert!(validate_sha256("abc").is_err());
    }

    #[test]
    fn a_swap_reports_what_it_replaced_and_the_state_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        for id in ["r1", "r2"] {
            std::fs::create_dir_all(root.join("releases").join(id)).unwrap();
        }
        let config = ReleaseConfig::new(root.to_str().unwrap());
        let swap = |id: &str, unless_active: bool| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(swap_script(&config, id, unless_active))
                .output()
                .unwrap();
            (
                out.status.code(),
                parse_swap(&String::from_utf8_lossy(&out.stdout)),
            )
        };
        let (code, first) = swap("r1", false);
        assert_eq!(code, Some(0));
        assert!(first.swapped);
        assert_eq!(first.replaced, None);
        assert_eq!(first.state.active.as_deref(), Some("r1"));
        assert_eq!(first.state.releases, vec!["r1", "r2"]);

        let (_, second) = swap("r2", false);
        assert!(second.swapped);
        assert_eq!(second.replaced.as_deref(), Some("r1"));
        assert_eq!(second.state.active.as_deref(), Some("r2"));
        assert_eq!(second.state.previous.as_deref(), Some("r1"));
        assert_eq!(
            std::fs::read_link(root.join("current")).unwrap(),
            root.join("releases/r2")
        );

        // Already active: left alone, and the state is still reported.
        let (code, again) = swap("r2", true);
        assert_eq!(code, Some(0));
        assert!(!again.swapped);
        assert_eq!(again.state, second.state);
        // Re-swapping to the active release keeps its rollback target.
        let (_, forced) = swap("r2", false);
        assert!(forced.swapped);
        assert_eq!(forced.state.previous.as_deref(), Some("r1"));

        let (code, _) = swap("r3", false);
        assert_eq!(code, Some(EXIT_NOT_SHIPPED as i32));
        // What the swap reports is what a separate look reads.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(state_script(&config))
            .output()
            .unwrap();
        assert_eq!(
            parse_state(&String::from_utf8_lossy(&out.stdout)),
            forced.state
        );
    }

    #[test]
    fn a_whole_ship_stages_and_only_the_commit_renames() {
        let s = ship_script(&cfg(), "r1", &"A".repeat(64), "t0k3n");
        let extract = s.find("tar -xzf - -C \"$tmp/tree\"").unwrap();
        let link = s.find("ln -s \"$root/shared/$p\"").unwrap();
        assert!(extract < link, "{s}");
        assert!(!s.contains("mv -T \"$tmp/tree\""), "{s}");
        assert!(s.contains(&format!("want={}", "a".repeat(64))));
        assert!(s.contains("flock -w"));
        let c = commit_script(&cfg(), "r1", &"A".repeat(64), "t0k3n", None);
        let token = c.find("\"$token\" ] ||").unwrap();
        let rename = c.find("mv -T \"$tmp/tree\" \"$rel\"").unwrap();
        assert!(token < rename, "{c}");
    }
}
