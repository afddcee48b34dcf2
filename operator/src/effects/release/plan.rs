//! The pure half of release shipping: validation, the remote scripts, and
//! reading what a node reports. No I/O here.

use sha2::{Digest, Sha256};

use super::ReleaseError;
use crate::effects::ssh::shell_quote;

/// Exit codes the ship and swap scripts use to say what went wrong.
pub const EXIT_CHECKSUM: u32 = 65;
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
fn lock_prelude(config: &ReleaseConfig) -> String {
    format!(
        "root={root}\nmkdir -p \"$root/releases\" \"$root/shared\" \"$root/.hangar\" || exit 70\n\
         exec 9>>\"$root/.hangar/lock\"\n\
         flock -w {LOCK_WAIT_SECS} 9 || {{ echo 'another release operation holds the node lock' >&2; exit {EXIT_LOCKED}; }}\n",
        root = config.root_q()
    )
}

/// Prints `present` when `releases/<id>` is complete and came from the
/// artifact with `sha256` (recorded in `.hangar/artifacts/<id>` when it was
/// shipped): an id is a name, and a republished one is shipped again.
pub fn is_shipped_script(config: &ReleaseConfig, id: &str, sha256: &str) -> String {
    format!(
        "if [ -d {root}/releases/{id} ] && [ \"$(cat {root}/.hangar/artifacts/{id} 2>/dev/null)\" = {want} ]; \
         then echo present; else echo absent; fi",
        root = config.root_q(),
        id = shell_quote(id),
        want = shell_quote(&sha256.to_ascii_lowercase()),
    )
}

/// Reads the tarball on stdin into `releases/<id>.tmp`, hashing it while
/// `tar` extracts (a FIFO feeds the hasher: no second pass, no copy on
/// disk), then verifies, links shared paths and renames into place.
pub fn ship_script(config: &ReleaseConfig, id: &str, sha256: &str) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(&format!(
        "id={id}\nwant={want}\nrel=\"$root/releases/$id\"\ntmp=\"$rel.tmp\"\n",
        id = shell_quote(id),
        want = shell_quote(&sha256.to_ascii_lowercase()),
    ));
    s.push_str(&format!(
        r#"art="$root/.hangar/artifacts/$id"
if [ -d "$rel" ] && [ "$(cat "$art" 2>/dev/null)" = "$want" ]; then cat >/dev/null; echo present; exit 0; fi
rm -rf "$tmp"
mkdir -p "$tmp/tree" && mkfifo "$tmp/hash.fifo" || exit 70
# OpenSSL's sha256 is several times faster than coreutils' where it exists.
if command -v openssl >/dev/null 2>&1; then
  openssl dgst -sha256 -r < "$tmp/hash.fifo" > "$tmp/sha256" &
else
  sha256sum < "$tmp/hash.fifo" > "$tmp/sha256" &
fi
hasher=$!
tee "$tmp/hash.fifo" | tar -xzf - -C "$tmp/tree" 2>"$tmp/tar.err"
untar=$?
wait "$hasher"
got=$(cut -c1-64 "$tmp/sha256" 2>/dev/null)
if [ "$got" != "$want" ]; then
  rm -rf "$tmp"
  echo "sha256=$got"
  exit {EXIT_CHECKSUM}
fi
if [ "$untar" -ne 0 ]; then
  cat "$tmp/tar.err" >&2
  rm -rf "$tmp"
  exit {EXIT_EXTRACT}
fi
"#
    ));
    s.push_str(&link_shared_script(config, "$tmp/tree"));
    s.push_str(
        r#"# A release of this id from another artifact is replaced (the node is
# out of service while it ships; the activation that follows runs hooks).
if [ -e "$rel" ]; then mv -T "$rel" "$tmp/replaced" || exit 71; fi
mv -T "$tmp/tree" "$rel" || exit 71
mkdir -p "$root/.hangar/artifacts" && printf '%s\n' "$want" > "$art.tmp" && mv -f "$art.tmp" "$art" || exit 72
rm -rf "$tmp"
{ grep -vxF "$id" "$root/.hangar/shipped" 2>/dev/null; echo "$id"; } > "$root/.hangar/shipped.tmp" \
  && mv -f "$root/.hangar/shipped.tmp" "$root/.hangar/shipped" || exit 72
echo shipped
"#,
    );
    s
}

/// Replaces each shared path in `tree` by a link into `shared/`. The first
/// release seeds `shared/<path>` from its own copy (or an empty directory);
/// later releases never overwrite what `shared/` holds.
fn link_shared_script(config: &ReleaseConfig, tree: &str) -> String {
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
/// crash in between).
pub fn swap_script(config: &ReleaseConfig, id: &str) -> String {
    let mut s = String::from("set -u\n");
    s.push_str(&lock_prelude(config));
    s.push_str(&format!("id={}\n", shell_quote(id)));
    s.push_str(&format!(
        r#"rel="$root/releases/$id"
[ -d "$rel" ] || {{ echo "release $id is not shipped" >&2; exit {EXIT_NOT_SHIPPED}; }}
old=$(readlink "$root/current" 2>/dev/null || true)
old=${{old##*/}}
prev=$old
if [ "$old" = "$id" ] && [ -f "$root/.hangar/state" ]; then
  prev=$(sed -n 's/^previous=//p' "$root/.hangar/state")
fi
ln -sfn "$rel" "$root/current.hangar-tmp" && mv -T "$root/current.hangar-tmp" "$root/current" || exit 74
printf 'active=%s\nprevious=%s\n' "$id" "$prev" > "$root/.hangar/state.tmp" \
  && mv -f "$root/.hangar/state.tmp" "$root/.hangar/state" || exit 74
echo "swapped $old -> $id"
"#
    ));
    s
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
    s.push_str("cur=$(readlink \"$root/current\" 2>/dev/null || true)\n");
    for v in victims {
        s.push_str(&format!(
            "v={v}\n[ \"$cur\" = \"$root/releases/$v\" ] || rm -rf \"$root/releases/$v\" \"$root/.hangar/artifacts/$v\"\n",
            v = shell_quote(v)
        ));
    }
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
        r#"root={root}
printf 'current=%s\n' "$(readlink "$root/current" 2>/dev/null || true)"
[ -f "$root/.hangar/state" ] && sed 's/^/state./' "$root/.hangar/state"
[ -f "$root/.hangar/shipped" ] && sed 's/^/shipped=/' "$root/.hangar/shipped"
if [ -d "$root/releases" ]; then
  for d in "$root"/releases/*; do [ -d "$d" ] && printf 'dir=%s\n' "${{d##*/}}"; done
fi
true
"#,
        root = config.root_q()
    )
}

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
    fn ship_script_verifies_before_renaming_and_quotes() {
        let s = ship_script(&cfg(), "r1", &"A".repeat(64));
        let verify = s.find("if [ \"$got\" != \"$want\" ]").unwrap();
        let rename = s.find("mv -T \"$tmp/tree\" \"$rel\"").unwrap();
        let link = s.find("ln -s \"$root/shared/$p\"").unwrap();
        assert!(verify < link && link < rename, "{s}");
        assert!(s.contains(&format!("want={}", "a".repeat(64))));
        assert!(s.contains("flock -w"));
    }
}
