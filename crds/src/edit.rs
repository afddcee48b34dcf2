//! Format-preserving edits of spec files: text in, text out, no I/O.
//!
//! `hangar release` (a person or a CI job) changes `spec.release.id`,
//! `.artifact` and `.sha256` of one cluster in a file people also edit by
//! hand and review in pull requests, so everything else stays byte for
//! byte: comments, key order, blank lines, indentation, line endings
//! (LF or CRLF), the other documents of the file. A value keeps its quoting
//! style (plain, `'single'` or `"double"`); a plain value is quoted only
//! when the new text would not read back as the same string.
//!
//! Only block mappings are edited (`spec:` and `release:` followed by
//! indented keys), and only single-line scalars. Anything where a textual
//! edit could mean something else — flow style (`release: {…}`), anchors
//! and aliases, block or multi-line scalars, a key given twice, a cluster
//! defined twice — is refused with the line and field path, never guessed.

use serde::Deserialize;

use crate::source_map;

/// The new release of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseEdit<'a> {
    pub id: &'a str,
    pub artifact: &'a str,
    pub sha256: &'a str,
}

/// Why a file could not be edited. Lines are 1-based, in the whole file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("invalid YAML: {0}")]
    InvalidYaml(String),
    #[error("no cluster named `{name}` in this file (clusters here: {found})")]
    ClusterNotFound { name: String, found: String },
    #[error(
        "cluster `{name}` is defined more than once in this file (documents at lines {lines})"
    )]
    DuplicateCluster { name: String, lines: String },
    #[error("line {line}: {path}: missing; add a `{key}:` block by hand first")]
    Missing {
        line: usize,
        path: String,
        key: &'static str,
    },
    #[error("line {line}: {path}: given more than once (also at line {first})")]
    DuplicateKey {
        line: usize,
        first: usize,
        path: String,
    },
    #[error("line {line}: {path}: {reason}; cannot edit it safely, change it by hand")]
    Unsupported {
        line: usize,
        path: String,
        reason: String,
    },
}

/// The fields `hangar release` sets, in the order they are written when
/// absent.
const FIELDS: [&str; 3] = ["id", "artifact", "sha256"];

/// Sets `spec.release.{id, artifact, sha256}` of cluster `cluster` in
/// `text` and returns the new text; nothing else changes.
pub fn set_release(text: &str, cluster: &str, edit: &ReleaseEdit<'_>) -> Result<String, EditError> {
    let (start, end) = find_document(text, cluster)?;
    let lines = lines_of(text, start, end);
    let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };

    let top = children(&lines, 0, lines.len(), "")?;
    let spec = single(&top, "spec", "spec")?.ok_or_else(|| EditError::Missing {
        line: lines.first().map_or(1, |l| l.number),
        path: "spec".into(),
        key: "spec",
    })?;
    let spec_block = block_of(&lines, &spec, "spec")?;
    let spec_children = children(&lines, spec_block.0, spec_block.1, "spec")?;
    let release =
        single(&spec_children, "release", "spec.release")?.ok_or_else(|| EditError::Missing {
            line: lines[spec.line].number,
            path: "spec.release".into(),
            key: "release",
        })?;
    let release_block = block_of(&lines, &release, "spec.release")?;
    let fields = children(&lines, release_block.0, release_block.1, "spec.release")?;

    // (byte offset, bytes to replace, replacement), applied back to front.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let values = [edit.id, edit.artifact, edit.sha256];
    let child_indent = fields
        .first()
        .map(|f| lines[f.line].indent)
        .unwrap_or_else(|| {
            // An empty `release:`: indent one step more, the step the file
            // uses under `spec:`.
            let step = spec_children
                .first()
                .map(|c| lines[c.line].indent)
                .filter(|&i| i > 0)
                .unwrap_or(2);
            lines[release.line].indent + step
        });
    // Where an absent field goes: after the field before it, else right
    // after `release:`.
    let mut insert_after = release.line;
    for (key, value) in FIELDS.iter().zip(values) {
        let path = format!("spec.release.{key}");
        match single(&fields, key, &path)? {
            Some(field) => {
                let line = &lines[field.line];
                let (from, len, replacement) = replace_scalar(line, &field, value, &path)?;
                if field.line + 1 < lines.len() {
                    // A plain scalar may continue on deeper-indented lines.
                    let next = lines[field.line + 1..]
                        .iter()
                        .find(|l| l.significant())
                        .filter(|l| l.indent > line.indent);
                    if let Some(next) = next {
                        return Err(EditError::Unsupported {
                            line: next.number,
                            path,
                            reason: "the value continues on the next line".into(),
                        });
                    }
                }
                edits.push((line.start + from, len, replacement));
                insert_after = field.line;
            }
            None => {
                let at = lines[insert_after].end_with_eol;
                let at_eof_without_eol =
                    lines[insert_after].end_with_eol == lines[insert_after].end;
                let mut new_line = String::new();
                if at_eof_without_eol {
                    new_line.push_str(eol);
                }
                new_line.push_str(&" ".repeat(child_indent));
                new_line.push_str(key);
                new_line.push_str(": ");
                new_line.push_str(&plain_or_double(value));
                if !at_eof_without_eol {
                    new_line.push_str(eol);
                }
                edits.push((at, 0, new_line));
            }
        }
    }
    // Insertions at one offset must keep field order: stable sort, then
    // apply back to front.
    let mut out = text.to_string();
    let mut order: Vec<usize> = (0..edits.len()).collect();
    order.sort_by_key(|&i| (edits[i].0, i));
    for &i in order.iter().rev() {
        let (at, len, ref s) = edits[i];
        out.replace_range(at..at + len, s);
    }
    Ok(out)
}

/// Byte range of the one document in `text` whose `metadata.name` is `cluster`.
fn find_document(text: &str, cluster: &str) -> Result<(usize, usize), EditError> {
    #[derive(Deserialize)]
    struct Named {
        metadata: Option<Meta>,
    }
    #[derive(Deserialize)]
    struct Meta {
        name: Option<String>,
    }
    let docs = source_map::scan(text).map_err(|e| match e.loc {
        Some(l) => EditError::InvalidYaml(format!("line {}:{}: {}", l.line, l.column, e.message)),
        None => EditError::InvalidYaml(e.message),
    })?;
    let mut found = Vec::new();
    let mut matches = Vec::new();
    for doc in docs.iter().filter(|d| d.has_content()) {
        let slice = &text[doc.start..doc.end];
        // Duplicate keys elsewhere must not hide the name; they are
        // reported below when they are in the fields edited.
        let mut options = serde_saphyr::Options::default();
        options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::FirstWins;
        let name = serde_saphyr::from_str_with_options::<Named>(slice, options)
            .ok()
            .and_then(|n| n.metadata)
            .and_then(|m| m.name);
        if let Some(name) = name {
            if name == cluster {
                matches.push((doc.start, doc.end, doc.first_line));
            }
            found.push(format!("`{name}`"));
        }
    }
    match matches.as_slice() {
        [(start, end, _)] => Ok((*start, *end)),
        [] => Err(EditError::ClusterNotFound {
            name: cluster.to_string(),
            found: if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            },
        }),
        many => Err(EditError::DuplicateCluster {
            name: cluster.to_string(),
            lines: many
                .iter()
                .map(|m| m.2.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// One line of the document, without its line ending.
#[derive(Debug)]
struct Line<'a> {
    /// 1-based line number in the file.
    number: usize,
    /// Byte offset of the line in the file.
    start: usize,
    /// Byte offset after the text (before `\r\n` / `\n`).
    end: usize,
    /// Byte offset after the line ending.
    end_with_eol: usize,
    text: &'a str,
    indent: usize,
}

impl Line<'_> {
    /// Neither blank, a comment, nor a document marker.
    fn significant(&self) -> bool {
        let body = self.text.trim_start();
        !(body.is_empty()
            || body.starts_with('#')
            || (self.indent == 0 && (is_marker(self.text, "---") || is_marker(self.text, "..."))))
    }
}

fn is_marker(text: &str, marker: &str) -> bool {
    text.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn lines_of(text: &str, start: usize, end: usize) -> Vec<Line<'_>> {
    let first_number = text[..start].matches('\n').count() + 1;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let nl = text[at..end].find('\n').map(|i| at + i);
        let (line_end, next) = match nl {
            Some(i) => (i, i + 1),
            None => (end, end),
        };
        let line_end = if text[at..line_end].ends_with('\r') {
            line_end - 1
        } else {
            line_end
        };
        let line = &text[at..line_end];
        let line = line.strip_prefix('\u{feff}').unwrap_or(line);
        let indent = line.len() - line.trim_start_matches(' ').len();
        out.push(Line {
            number: first_number + out.len(),
            start: line_end - line.len(),
            end: line_end,
            end_with_eol: next,
            text: line,
            indent,
        });
        at = next;
    }
    out
}

/// A `key:` line of a block mapping.
#[derive(Clone, Debug)]
struct Key {
    /// Index into the document's lines.
    line: usize,
    /// 1-based line number in the file.
    number: usize,
    name: String,
    /// Byte offset (in the line) just after the `:`.
    after_colon: usize,
}

/// The keys of the block mapping on lines `from..to` (its indentation is
/// that of its first significant line).
fn children(lines: &[Line<'_>], from: usize, to: usize, path: &str) -> Result<Vec<Key>, EditError> {
    let mut out = Vec::new();
    let Some(indent) = lines[from..to]
        .iter()
        .find(|l| l.significant())
        .map(|l| l.indent)
    else {
        return Ok(out);
    };
    for (i, line) in lines.iter().enumerate().take(to).skip(from) {
        if !line.significant() || line.indent > indent {
            continue;
        }
        let body = &line.text[line.indent..];
        if line.text[..line.indent].contains('\t') || body.starts_with('\t') {
            return Err(unsupported(line, path, "tab in indentation"));
        }
        if body.starts_with("- ") || body == "-" {
            return Err(unsupported(
                line,
                path,
                "a sequence where a mapping was expected",
            ));
        }
        match parse_key(body) {
            Some((name, after)) => out.push(Key {
                line: i,
                number: line.number,
                name,
                after_colon: line.indent + after,
            }),
            None => {
                return Err(unsupported(
                    line,
                    path,
                    "not a `key: value` line of a block mapping",
                ))
            }
        }
    }
    Ok(out)
}

/// The one key named `key`, if any; a second one is an error.
fn single(keys: &[Key], key: &str, path: &str) -> Result<Option<Key>, EditError> {
    let mut hits = keys.iter().filter(|k| k.name == key);
    let first = hits.next();
    if let (Some(first), Some(second)) = (first, hits.next()) {
        return Err(EditError::DuplicateKey {
            line: second.number,
            first: first.number,
            path: path.to_string(),
        });
    }
    Ok(first.cloned())
}

/// The lines of the nested block under `key:`; the key line itself must
/// end after the colon (a comment allowed).
fn block_of(lines: &[Line<'_>], key: &Key, path: &str) -> Result<(usize, usize), EditError> {
    let line = &lines[key.line];
    let rest = line.text[key.after_colon..].trim_start();
    if !(rest.is_empty() || rest.starts_with('#')) {
        let what = if rest.starts_with('{') {
            "written in flow style (`{…}`)".to_string()
        } else if rest.starts_with('&') || rest.starts_with('*') {
            "an anchor or alias (other places may share it)".to_string()
        } else {
            format!("not a block mapping (`{rest}`)")
        };
        return Err(unsupported(line, path, &what));
    }
    let from = key.line + 1;
    let to = lines[from..]
        .iter()
        .position(|l| l.significant() && l.indent <= line.indent)
        .map_or(lines.len(), |p| from + p);
    Ok((from, to))
}

/// `name` and the byte offset after its `:`, for `name: …` / `"name": …`.
fn parse_key(body: &str) -> Option<(String, usize)> {
    let (name, after_name) = if let Some(q @ ('"' | '\'')) = body.chars().next() {
        let close = body[1..].find(q)? + 1;
        (body[1..close].to_string(), close + 1)
    } else {
        let mut colon = None;
        for (i, _) in body.match_indices(':') {
            let next = body[i + 1..].chars().next();
            if matches!(next, None | Some(' ') | Some('\t')) {
                colon = Some(i);
                break;
            }
        }
        let i = colon?;
        let name = body[..i].trim_end();
        if name.is_empty() || name.starts_with(['{', '[', '&', '*', '!', '?', '|', '>']) {
            return None;
        }
        (name.to_string(), i)
    };
    let rest = &body[after_name..];
    let rest_trim = rest.trim_start_matches([' ', '\t']);
    let colon_at = after_name + (rest.len() - rest_trim.len());
    if !rest_trim.starts_with(':') {
        return None;
    }
    let after = colon_at + 1;
    match body[after..].chars().next() {
        None | Some(' ') | Some('\t') => Some((name, after)),
        _ => None,
    }
}

/// Where the value of `key` sits in its line and what replaces it.
fn replace_scalar(
    line: &Line<'_>,
    key: &Key,
    value: &str,
    path: &str,
) -> Result<(usize, usize, String), EditError> {
    let after = key.after_colon;
    let rest = &line.text[after..];
    let lead = rest.len() - rest.trim_start_matches([' ', '\t']).len();
    let from = after + lead;
    let v = &line.text[from..];
    let (len, replacement) = match v.chars().next() {
        None | Some('#') => {
            // `id:` with no value: write one after a space, keep a comment.
            let sep = if lead == 0 { " " } else { "" };
            let comment = if v.is_empty() { "" } else { " " };
            return Ok((from, 0, format!("{sep}{}{comment}", plain_or_double(value))));
        }
        Some('"') => {
            let len = double_quoted_len(v).ok_or_else(|| {
                unsupported(
                    line,
                    path,
                    "a double-quoted value that continues on the next line",
                )
            })?;
            (len, double_quoted(value))
        }
        Some('\'') => {
            let len = single_quoted_len(v).ok_or_else(|| {
                unsupported(
                    line,
                    path,
                    "a single-quoted value that continues on the next line",
                )
            })?;
            let replacement = if value.chars().any(char::is_control) {
                double_quoted(value)
            } else {
                format!("'{}'", value.replace('\'', "''"))
            };
            (len, replacement)
        }
        Some(c @ ('|' | '>')) => {
            return Err(unsupported(line, path, &format!("a block scalar (`{c}`)")))
        }
        Some('&' | '*') => {
            return Err(unsupported(
                line,
                path,
                "an anchor or alias (other places may share it)",
            ))
        }
        Some('!') => return Err(unsupported(line, path, "a tagged value")),
        Some('[' | '{') => return Err(unsupported(line, path, "not a single scalar")),
        Some(_) => {
            // A plain scalar ends at ` #` (a comment) or the end of the line.
            let end = v
                .match_indices('#')
                .find(|(i, _)| v[..*i].ends_with([' ', '\t']))
                .map_or(v.len(), |(i, _)| i);
            (v[..end].trim_end().len(), plain_or_double(value))
        }
    };
    // Nothing but a comment may follow a quoted value.
    let tail = v[len..].trim_start_matches([' ', '\t']);
    if !(tail.is_empty() || tail.starts_with('#')) {
        return Err(unsupported(
            line,
            path,
            &format!("unexpected `{tail}` after the value"),
        ));
    }
    Ok((from, len, replacement))
}

/// Length of a `"…"` scalar at the start of `v`, if it closes on this line.
fn double_quoted_len(v: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in v.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// Length of a `'…'` scalar at the start of `v` (`''` is a quote).
fn single_quoted_len(v: &str) -> Option<usize> {
    let bytes = v.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            if bytes.get(i + 1) == Some(&b'\'') {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

fn double_quoted(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('"');
    for c in value.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// `value` as a plain scalar when YAML reads that back as the same string,
/// else double-quoted.
fn plain_or_double(value: &str) -> String {
    if plain_is_safe(value) {
        value.to_string()
    } else {
        double_quoted(value)
    }
}

fn plain_is_safe(value: &str) -> bool {
    let Some(first) = value.chars().next() else {
        return false;
    };
    let chars_ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._/:+-=~@%,".contains(c));
    let starts_ok = first.is_ascii_alphanumeric() || "./".contains(first);
    // Words and numbers YAML would read as something other than a string.
    let lower = value.to_ascii_lowercase();
    let typed = matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    ) || value.parse::<f64>().is_ok()
        || lower.starts_with("0x")
        || lower.starts_with("0o")
        || lower.starts_with("0b")
        || matches!(lower.as_str(), ".inf" | "-.inf" | "+.inf" | ".nan");
    chars_ok && starts_ok && !typed && !value.contains(": ") && !value.ends_with(':')
}

fn unsupported(line: &Line<'_>, path: &str, reason: &str) -> EditError {
    EditError::Unsupported {
        line: line.number,
        path: if path.is_empty() {
            "(top level)".into()
        } else {
            path.to_string()
        },
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
