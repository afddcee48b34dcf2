//! A release tree, entry by entry: what `tar -xzf` of the artifact leaves
//! in `releases/<id>`, derived from the verified artifact on the operator.
//!
//! A delta ship diffs two manifests to decide what a node can link from its
//! previous release and what it must receive, then checks the tree it built
//! against the new manifest before anything is renamed into place; the node
//! keeps the manifest of each release (`.hangar/manifests/<id>`) so the
//! next release can be diffed against it.
//!
//! The text form is one line per entry, sorted by path (bytewise), fields
//! separated by tabs:
//!
//! ```text
//! #hangar-manifest v1
//! path  kind  mode  mtime  size  sha256  target  uid  gid
//! ```
//!
//! `kind` is `f` (regular file), `d` (directory) or `l` (symlink); `mode`
//! is octal as `find -printf %m` prints it (`*` for a directory `tar`
//! creates on its own, whose mode follows the umask); `mtime` is the
//! archive's (seconds, with the fraction a pax header gave); fields that do
//! not apply to a kind are `-`. The node checks the first seven fields
//! (whole seconds of `mtime`); owner ids are only used to decide what may be
//! linked. Anything this format cannot state faithfully (devices, FIFOs,
//! sparse files, names with control characters or backslashes, `..`,
//! duplicate or shadowed paths) makes the artifact [`ManifestError::Unsupported`]:
//! it is then always shipped whole.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The first line of every manifest text.
pub const HEADER: &str = "#hangar-manifest v1";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read artifact {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("artifact {path}: expected sha256 {expected}, read {actual}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("artifact {path} is not a gzip'd tar: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The artifact is fine, but only a full ship reproduces it exactly.
    #[error("only shipped whole: {reason}")]
    Unsupported { reason: String },
    #[error("malformed manifest, line {line}: {reason}")]
    Format { line: usize, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    fn letter(self) -> &'static str {
        match self {
            Kind::File => "f",
            Kind::Dir => "d",
            Kind::Symlink => "l",
        }
    }
}

/// One path of a release tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative, normalised (`a/b`, never `./a/b` or `a/b/`).
    pub path: String,
    pub kind: Kind,
    /// Permission bits; `None` for a directory the archive does not list
    /// (and symlinks, whose mode Linux ignores).
    pub mode: Option<u32>,
    /// Files: seconds since the epoch as the archive states it
    /// (`1704067200`, or `1704067200.5` from a pax header).
    pub mtime: Option<String>,
    pub size: u64,
    /// Files: lowercase hex.
    pub sha256: Option<String>,
    /// Symlinks: where they point (verbatim).
    pub target: Option<String>,
    pub uid: u64,
    pub gid: u64,
    /// Where the entry comes from in the artifact (its index among the
    /// archive's members), when it does; never part of the text.
    pub member: Option<usize>,
    /// A hard-link member: the path it links to (never part of the text).
    pub hardlink_to: Option<String>,
}

impl Entry {
    fn implicit_dir(path: String) -> Entry {
        Entry {
            path,
            kind: Kind::Dir,
            mode: None,
            mtime: None,
            size: 0,
            sha256: None,
            target: None,
            uid: 0,
            gid: 0,
            member: None,
            hardlink_to: None,
        }
    }

    /// Same content and the same attributes a hard link would share.
    pub fn same_inode_as(&self, other: &Entry) -> bool {
        self.kind == Kind::File
            && other.kind == Kind::File
            && self.sha256 == other.sha256
            && self.size == other.size
            && self.mode == other.mode
            && self.mtime == other.mtime
            && self.uid == other.uid
            && self.gid == other.gid
    }

    fn line(&self) -> String {
        let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
        let mode = match (self.kind, self.mode) {
            (Kind::Symlink, _) => "-".to_string(),
            (_, None) => "*".to_string(),
            (_, Some(m)) => format!("{m:o}"),
        };
        let size = match self.kind {
            Kind::File => self.size.to_string(),
            _ => "-".into(),
        };
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.path,
            self.kind.letter(),
            mode,
            dash(self.mtime.as_deref()),
            size,
            dash(self.sha256.as_deref()),
            dash(self.target.as_deref()),
            self.uid,
            self.gid
        )
    }
}

/// What a node does to a tree after `tar`: the facts [`Manifest::for_node`]
/// needs to predict the tree exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub app_root: String,
    pub shared_paths: Vec<String>,
    /// `Some(umask)` when hangar logs in as a user other than root: `tar`
    /// then applies the umask to every mode (as root it restores modes).
    pub umask: Option<u32>,
}

/// Every entry of a release tree, sorted by path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// The archive's own `./` member (it sets the release directory's mode).
    root_member: Option<usize>,
}

impl Manifest {
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn root_member(&self) -> Option<usize> {
        self.root_member
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Bytes of all regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.size)
            .sum()
    }

    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(self.entries.len() * 120 + 32);
        s.push_str(HEADER);
        s.push('\n');
        for e in &self.entries {
            s.push_str(&e.line());
            s.push('\n');
        }
        s
    }

    /// The sha256 of [`to_text`](Self::to_text): names a manifest on nodes
    /// and in the operator's memory.
    pub fn text_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.to_text().as_bytes()))
    }

    /// Reads a manifest text (one a node kept, or [`to_text`](Self::to_text)).
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let bad = |line: usize, reason: &str| ManifestError::Format {
            line,
            reason: reason.to_string(),
        };
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h == HEADER => {}
            _ => return Err(bad(1, "no `#hangar-manifest v1` header")),
        }
        let mut entries = Vec::new();
        for (i, line) in lines {
            let n = i + 1;
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 9 {
                return Err(bad(n, "expected 9 tab-separated fields"));
            }
            let opt = |v: &str| (v != "-").then(|| v.to_string());
            let kind = match f[1] {
                "f" => Kind::File,
                "d" => Kind::Dir,
                "l" => Kind::Symlink,
                _ => return Err(bad(n, "unknown kind")),
            };
            let mode = match f[2] {
                "-" | "*" => None,
                m => Some(u32::from_str_radix(m, 8).map_err(|_| bad(n, "bad mode"))?),
            };
            let size = match f[4] {
                "-" => 0,
                s => s.parse().map_err(|_| bad(n, "bad size"))?,
            };
            let e = Entry {
                path: f[0].to_string(),
                kind,
                mode,
                mtime: opt(f[3]),
                size,
                sha256: opt(f[5]),
                target: opt(f[6]),
                uid: f[7].parse().map_err(|_| bad(n, "bad uid"))?,
                gid: f[8].parse().map_err(|_| bad(n, "bad gid"))?,
                member: None,
                hardlink_to: None,
            };
            check_name(&e.path).map_err(|r| bad(n, &r))?;
            if kind == Kind::File && (e.sha256.is_none() || e.mode.is_none() || e.mtime.is_none()) {
                return Err(bad(n, "a file needs mode, mtime and sha256"));
            }
            if kind == Kind::Symlink && e.target.is_none() {
                return Err(bad(n, "a symlink needs a target"));
            }
            entries.push(e);
        }
        let manifest = Manifest::from_unsorted(entries).map_err(|r| bad(0, &r))?;
        Ok(manifest)
    }

    /// Sorts, rejects duplicates and paths below a non-directory, and adds
    /// the directories `tar` would create implicitly.
    fn from_unsorted(mut entries: Vec<Entry>) -> Result<Manifest, String> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
            return Err(format!("`{}` appears twice", w[0].path));
        }
        let kinds: BTreeMap<&str, Kind> =
            entries.iter().map(|e| (e.path.as_str(), e.kind)).collect();
        let mut implicit = BTreeMap::new();
        for e in &entries {
            let mut parent = e.path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                match kinds.get(p) {
                    Some(Kind::Dir) => {}
                    Some(_) => {
                        return Err(format!("`{}` lies below the non-directory `{p}`", e.path))
                    }
                    None => {
                        implicit.insert(p.to_string(), ());
                    }
                }
                parent = p;
            }
        }
        if !implicit.is_empty() {
            entries.extend(implicit.into_keys().map(Entry::implicit_dir));
            entries.sort_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(Manifest {
            entries,
            root_member: None,
        })
    }

    /// The tree as it stands on a node once shipped: shared paths replaced
    /// by links into `shared/` (their parents created if missing), and,
    /// for a non-root login, modes under its umask.
    pub fn for_node(&self, view: &NodeView) -> Manifest {
        let shared = |path: &str| {
            view.shared_paths
                .iter()
                .any(|p| path == p || path.starts_with(&format!("{p}/")))
        };
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| !shared(&e.path))
            .cloned()
            .collect();
        if let Some(umask) = view.umask {
            for e in &mut entries {
                if e.kind != Kind::Symlink {
                    e.mode = e.mode.map(|m| m & !umask);
                }
            }
        }
        for p in &view.shared_paths {
            entries.push(Entry {
                path: p.clone(),
                kind: Kind::Symlink,
                mode: None,
                mtime: None,
                size: 0,
                sha256: None,
                target: Some(format!("{}/shared/{p}", view.app_root)),
                uid: 0,
                gid: 0,
                member: None,
                hardlink_to: None,
            });
        }
        // Shared paths are validated relative paths; nesting one below a
        // file would fail on the node the same way for a full ship.
        let mut m = Manifest::from_unsorted(entries).unwrap_or_else(|_| self.clone());
        m.root_member = self.root_member;
        m
    }
}

/// Rejects names the text form (and the node's line tools) cannot carry.
fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty name".into());
    }
    if s.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'\\') {
        return Err(format!(
            "`{}` has a control character or backslash",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// `./a//b/` → `a/b`; `None` for the archive's root. `..` is refused.
fn normalise(raw: &[u8]) -> Result<Option<String>, String> {
    let s = std::str::from_utf8(raw)
        .map_err(|_| format!("`{}` is not UTF-8", String::from_utf8_lossy(raw)))?;
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("`{s}` contains `..`")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let p = parts.join("/");
    check_name(&p)?;
    Ok(Some(p))
}

/// Hashes every byte read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads the artifact once: checks its sha256 and lists every member.
/// Blocking (file I/O and CPU): call it from a blocking thread.
pub fn derive(path: &Path, sha256: &str) -> Result<Manifest, ManifestError> {
    let io_err = |e: io::Error| ManifestError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // Opening a pipe would block, reading it would take bytes from
    // whoever else reads it: only a file can be read a second time.
    if !std::fs::metadata(path).map_err(io_err)?.is_file() {
        return Err(ManifestError::Io {
            path: path.to_path_buf(),
            reason: "not a regular file: read once, it cannot be read again".into(),
        });
    }
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut hashing = Hashing {
        inner: io::BufReader::with_capacity(256 * 1024, file),
        hasher: Sha256::new(),
    };
    let listed = {
        let gz = flate2::read::MultiGzDecoder::new(&mut hashing);
        list_members(gz)
    };
    // Whatever the decoder left unread still counts toward the checksum.
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err)?;
    let actual = hex::encode(hashing.hasher.finalize());
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(ManifestError::Checksum {
            path: path.to_path_buf(),
            expected: sha256.to_string(),
            actual,
        });
    }
    match listed {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(reason)) => Err(ManifestError::Unsupported { reason }),
        Err(e) => Err(ManifestError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Lists a (decompressed) tar stream: `Err` when it is unreadable,
/// `Ok(Err(reason))` when it cannot be described faithfully.
pub fn list_members(reader: impl Read) -> io::Result<Result<Manifest, String>> {
    let mut archive = tar::Archive::new(reader);
    let mut entries: Vec<Entry> = Vec::new();
    let mut files: BTreeMap<String, usize> = BTreeMap::new();
    let mut unsupported: Option<String> = None;
    let mut root_member = None;
    for (member, entry) in archive.entries()?.enumerate() {
        let mut entry = entry?;
        let etype = entry.header().entry_type();
        if unsupported.is_some() {
            // Keep reading: the whole stream must still be valid.
            io::copy(&mut entry, &mut io::sink())?;
            continue;
        }
        if etype.is_pax_global_extensions() {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            // `git archive` writes one with the commit id; tar ignores it.
            let only_comment = tar::PaxExtensions::new(&data)
                .all(|x| x.map(|x| x.key_bytes() == b"comment").unwrap_or(false));
            if !only_comment {
                unsupported = Some("a pax global header other than a comment".into());
            }
            continue;
        }
        let path = match normalise(&entry.path_bytes()) {
            Ok(Some(p)) => p,
            Ok(None) if etype.is_dir() => {
                root_member = Some(member);
                io::copy(&mut entry, &mut io::sink())?;
                continue;
            }
            Ok(None) => {
                unsupported = Some("a non-directory member names the root".into());
                continue;
            }
            Err(reason) => {
                unsupported = Some(reason);
                continue;
            }
        };
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let (uid, gid) = (header.uid()?, header.gid()?);
        let mut mtime = header.mtime()?.to_string();
        if let Some(pax) = entry.pax_extensions()? {
            for x in pax.flatten() {
                if x.key_bytes() == b"mtime" {
                    let v = String::from_utf8_lossy(x.value_bytes()).into_owned();
                    if !valid_mtime(&v) {
                        unsupported = Some(format!("`{path}` has a pax mtime `{v}`"));
                    }
                    mtime = v;
                }
            }
        }
        let base = Entry {
            path: path.clone(),
            kind: Kind::File,
            mode: Some(mode),
            mtime: None,
            size: 0,
            sha256: None,
            target: None,
            uid,
            gid,
            member: Some(member),
            hardlink_to: None,
        };
        let e = if etype.is_file() || etype.is_contiguous() {
            let mut hasher = Sha256::new();
            let size = io::copy(&mut entry, &mut HashSink(&mut hasher))?;
            files.insert(path.clone(), entries.len());
            Entry {
                mtime: Some(mtime),
                size,
                sha256: Some(hex::encode(hasher.finalize())),
                ..base
            }
        } else if etype.is_dir() {
            Entry {
                kind: Kind::Dir,
                ..base
            }
        } else if etype.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            if let Err(reason) = check_name(&target) {
                unsupported = Some(format!("symlink `{path}`: {reason}"));
                continue;
            }
            Entry {
                kind: Kind::Symlink,
                mode: None,
                target: Some(target),
                ..base
            }
        } else if etype.is_hard_link() {
            // tar links it to an earlier member: same inode, so that
            // member's content and attributes.
            let linked = entry
                .link_name_bytes()
                .map(|t| normalise(&t))
                .transpose()
                .ok()
                .flatten()
                .flatten();
            match linked.and_then(|t| files.get(&t).map(|&i| (t, entries[i].clone()))) {
                Some((to, t)) => {
                    files.insert(path.clone(), entries.len());
                    Entry {
                        path: path.clone(),
                        member: Some(member),
                        hardlink_to: Some(to),
                        ..t
                    }
                }
                None => {
                    unsupported = Some(format!("hard link `{path}` to a non-file"));
                    continue;
                }
            }
        } else {
            unsupported = Some(format!(
                "`{path}` is a {:?} member",
                etype.as_byte() as char
            ));
            continue;
        };
        io::copy(&mut entry, &mut io::sink())?;
        entries.push(e);
    }
    if let Some(reason) = unsupported {
        return Ok(Err(reason));
    }
    Ok(Manifest::from_unsorted(entries).map(|mut m| {
        m.root_member = root_member;
        m
    }))
}

fn valid_mtime(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, "0"));
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && !frac.is_empty()
        && frac.bytes().all(|b| b.is_ascii_digit())
}

struct HashSink<'a>(&'a mut Sha256);

impl io::Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::effects::release::test_tar::{self, Member};

    fn tar_of(members: &[Member<'_>]) -> Vec<u8> {
        test_tar::tar_of(members, 1000)
    }

    fn list(members: &[Member<'_>]) -> Result<Manifest, String> {
        list_members(&tar_of(members)[..]).unwrap()
    }

    use tar::EntryType as T;

    #[test]
    fn lists_files_dirs_links_and_implicit_parents() {
        let m = list(&[
            ("./app/", T::Directory, 0o750, b"", None),
            ("./app/index.php", T::Regular, 0o644, b"<?php echo 1;", None),
            ("./vendor/autoload.php", T::Regular, 0o600, b"x", None),
            ("./public", T::Symlink, 0o777, b"", Some("app")),
            ("./bin/tool", T::Regular, 0o4755, b"#!/bin/sh\n", None),
            ("./same", T::Link, 0o644, b"", Some("./app/index.php")),
        ])
        .unwrap();
        let text = m.to_text();
        let sha = hex::encode(Sha256::digest(b"<?php echo 1;"));
        assert_eq!(
            text,
            format!(
                "{HEADER}\n\
                 app\td\t750\t-\t-\t-\t-\t1000\t1000\n\
                 app/index.php\tf\t644\t1704067200\t13\t{sha}\t-\t1000\t1000\n\
                 bin\td\t*\t-\t-\t-\t-\t0\t0\n\
                 bin/tool\tf\t4755\t1704067200\t10\t{}\t-\t1000\t1000\n\
                 public\tl\t-\t-\t-\t-\tapp\t1000\t1000\n\
                 same\tf\t644\t1704067200\t13\t{sha}\t-\t1000\t1000\n\
                 vendor\td\t*\t-\t-\t-\t-\t0\t0\n\
                 vendor/autoload.php\tf\t600\t1704067200\t1\t{}\t-\t1000\t1000\n",
                hex::encode(Sha256::digest(b"#!/bin/sh\n")),
                hex::encode(Sha256::digest(b"x")),
            )
        );
        assert_eq!(Manifest::parse(&text).unwrap().to_text(), text);
        assert_eq!(m.file_bytes(), 13 + 10 + 13 + 1);
    }

    #[test]
    fn what_the_text_cannot_state_is_unsupported() {
        for (members, why) in [
            (vec![("a\nb", T::Regular, 0o644, &b""[..], None)], "control"),
            (
                vec![("a\\b", T::Regular, 0o644, &b""[..], None)],
                "backslash",
            ),
            (vec![("p", T::Fifo, 0o644, &b""[..], None)], "member"),
            (
                vec![
                    ("a", T::Regular, 0o644, &b"1"[..], None),
                    ("./a", T::Regular, 0o644, &b"2"[..], None),
                ],
                "twice",
            ),
            (
                vec![
                    ("l", T::Symlink, 0o777, &b""[..], Some("/etc")),
                    ("l/passwd", T::Regular, 0o644, &b""[..], None),
                ],
                "below",
            ),
            (
                vec![("h", T::Link, 0o644, &b""[..], Some("missing"))],
                "hard link",
            ),
        ] {
            let err = list(&members).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn for_node_links_shared_paths_and_applies_the_umask() {
        let m = list(&[
            ("storage/", T::Directory, 0o775, b"", None),
            ("storage/logs/", T::Directory, 0o775, b"", None),
            ("storage/logs/seed.log", T::Regular, 0o664, b"seed", None),
            ("app.php", T::Regular, 0o664, b"x", None),
        ])
        .unwrap();
        let view = NodeView {
            app_root: "/srv/app".into(),
            shared_paths: vec!["storage/logs".into(), "var/cache".into()],
            umask: Some(0o022),
        };
        let n = m.for_node(&view);
        let lines: Vec<String> = n
            .entries()
            .iter()
            .map(|e| e.line().split('\t').take(7).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            lines,
            vec![
                format!(
                    "app.php f 644 1704067200 1 {} -",
                    hex::encode(Sha256::digest(b"x"))
                ),
                "storage d 755 - - - -".into(),
                "storage/logs l - - - - /srv/app/shared/storage/logs".into(),
                "var d * - - - -".into(),
                "var/cache l - - - - /srv/app/shared/var/cache".into(),
            ]
        );
        let root = NodeView {
            umask: None,
            ..view
        };
        assert_eq!(m.for_node(&root).get("app.php").unwrap().mode, Some(0o664));
    }

    #[test]
    fn parse_refuses_what_it_cannot_trust() {
        for bad in [
            "",
            "no header\n",
            "#hangar-manifest v1\na\tf\t644\n",
            "#hangar-manifest v1\na\tx\t644\t1\t1\tab\t-\t0\t0\n",
            "#hangar-manifest v1\na\tf\t644\t-\t1\t-\t-\t0\t0\n",
            "#hangar-manifest v1\na\tl\t-\t-\t-\t-\t-\t0\t0\n",
            "#hangar-manifest v1\na\tl\t-\t-\t-\t-\tb\t0\t0\na/b\td\t755\t-\t-\t-\t-\t0\t0\n",
        ] {
            assert!(Manifest::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn derive_checks_the_artifact_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let tar = tar_of(&[("a", T::Regular, 0o644, b"hello", None)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let bytes = gz.finish().unwrap();
        let path = dir.path().join("a.tar.gz");
        std::fs::write(&path, &bytes).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let m = derive(&path, &sha).unwrap();
        assert_eq!(m.get("a").unwrap().size, 5);
        assert_eq!(m.get("a").unwrap().member, Some(0));
        assert!(matches!(
            derive(&path, &"0".repeat(64)),
            Err(ManifestError::Checksum { .. })
        ));
        std::fs::write(&path, b"not gzip").unwrap();
        let sha = hex::encode(Sha256::digest(b"not gzip"));
        assert!(matches!(
            derive(&path, &sha),
            Err(ManifestError::Corrupt { .. })
        ));
    }
}
