//! Where each field of a YAML file sits, so a problem found on the typed
//! spec (`spec.capacity.min`) can be reported at its line and column.
//!
//! One pass over the parser's events also splits a multi-document file, so
//! each document is deserialized on its own: a broken document does not hide
//! its neighbours.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// Deeper nesting than any real spec; stops pathological input early.
const MAX_DEPTH: usize = 64;

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub line: u64,
    pub column: u64,
}

/// One YAML document of a file.
#[derive(Debug, Default)]
pub struct Document {
    /// First line (1-based) of the document's text in the file.
    pub first_line: usize,
    /// Byte range of the document's text, whole lines.
    pub start: usize,
    pub end: usize,
    /// Field path → where its key (or, for sequence items, the item) starts.
    by_path: HashMap<String, Loc>,
    has_content: bool,
}

impl Document {
    pub fn has_content(&self) -> bool {
        self.has_content
    }

    pub fn locate(&self, path: &str) -> Option<Loc> {
        // Fall back to the closest ancestor that exists (a missing field is
        // best shown at the mapping that lacks it).
        let mut p = path;
        loop {
            if let Some(loc) = self.by_path.get(p) {
                return Some(*loc);
            }
            p = parent(p)?;
        }
    }

    fn record_key(&mut self, path: &str, loc: Loc) {
        self.by_path.entry(path.to_string()).or_insert(loc);
    }

    fn record_value(&mut self, path: &str, loc: Loc) {
        self.has_content = true;
        self.by_path.entry(path.to_string()).or_insert(loc);
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Appends a key to a path: `spec` + `capacity` → `spec.capacity`.
pub fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

/// A syntax error the scanner hit before any deserialization.
#[derive(Debug)]
pub struct ScanError {
    pub loc: Option<Loc>,
    pub message: String,
}

/// Splits `text` into documents and maps each document's fields.
pub fn scan(text: &str) -> Result<Vec<Document>, ScanError> {
    let line_starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let line_start = |line: usize| {
        line_starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(text.len())
    };

    let mut docs: Vec<Document> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| ScanError {
            loc: Some(Loc {
                line: e.marker().line() as u64,
                column: e.marker().col() as u64 + 1,
            }),
            message: e.kind().to_string(),
        })?;
        let loc = Loc {
            line: span.start.line() as u64,
            column: span.start.col() as u64 + 1,
        };
        match event {
            Event::DocumentStart(..) => {
                // The first document owns everything before it (comments,
                // a modeline); later ones start at their `---` line.
                let first_line = if docs.is_empty() {
                    1
                } else {
                    span.start.line()
                };
                if let Some(prev) = docs.last_mut() {
                    prev.end = line_start(first_line);
                }
                docs.push(Document {
                    first_line,
                    start: line_start(first_line),
                    end: text.len(),
                    ..Document::default()
                });
                stack.clear();
            }
            Event::Scalar(value, ..) => {
                let Some(doc) = docs.last_mut() else { continue };
                match stack.last_mut() {
                    Some(Frame::Map { path, key }) if key.is_none() => {
                        let p = child(path, &value);
                        doc.record_key(&p, loc);
                        *key = Some(value.into_owned());
                    }
                    _ => {
                        let p = value_path(&stack);
                        doc.record_value(&p, loc);
                        advance(&mut stack);
                    }
                }
            }
            Event::Alias(..) => {
                let Some(doc) = docs.last_mut() else { continue };
                if !matches!(stack.last(), Some(Frame::Map { key: None, .. })) {
                    let p = value_path(&stack);
                    doc.record_value(&p, loc);
                }
                advance_or_key(&mut stack);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let Some(doc) = docs.last_mut() else { continue };
                if stack.len() >= MAX_DEPTH {
                    return Err(ScanError {
                        loc: Some(loc),
                        message: format!("nesting deeper than {MAX_DEPTH} levels"),
                    });
                }
                // A collection used as a mapping key is not something a
                // spec has; give it a placeholder name so paths stay sane.
                if let Some(Frame::Map {
                    key: key @ None, ..
                }) = stack.last_mut()
                {
                    *key = Some("?".to_string());
                }
                let p = value_path(&stack);
                doc.record_value(&p, loc);
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { path: p, key: None }
                } else {
                    Frame::Seq { path: p, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                advance(&mut stack);
            }
            _ => {}
        }
    }
    Ok(docs)
}

/// The path of the value about to be read at the top of `stack`.
fn value_path(stack: &[Frame]) -> String {
    match stack.last() {
        None => String::new(),
        Some(Frame::Map { path, key }) => child(path, key.as_deref().unwrap_or("?")),
        Some(Frame::Seq { path, index }) => format!("{path}[{index}]"),
    }
}

/// A value finished: the enclosing mapping now expects a key, the enclosing
/// sequence its next item.
fn advance(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { key, .. }) => *key = None,
        Some(Frame::Seq { index, .. }) => *index += 1,
        None => {}
    }
}

/// An alias may stand for a key or for a value.
fn advance_or_key(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map {
            key: key @ None, ..
        }) => *key = Some("*".to_string()),
        _ => advance(stack),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# leading comment
apiVersion: hangar/v1alpha1
spec:
  capacity: { min: 5, max: 3 }
  schedules:
    - name: night
      cron: \"0 22 * * *\"
    - name: day
---
metadata:
  name: second
";

    #[test]
    fn maps_keys_and_items_to_positions() {
        let docs = scan(TEXT).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.locate("apiVersion"), Some(Loc { line: 2, column: 1 }));
        assert_eq!(
            d.locate("spec.capacity.max"),
            Some(Loc {
                line: 4,
                column: 23
            })
        );
        assert_eq!(
            d.locate("spec.schedules[0].cron"),
            Some(Loc { line: 7, column: 7 })
        );
        assert_eq!(
            d.locate("spec.schedules[1].name"),
            Some(Loc { line: 8, column: 7 })
        );
        // A missing field is shown at its nearest existing ancestor.
        assert_eq!(d.locate("spec.capacity.nope"), d.locate("spec.capacity"));
    }

    #[test]
    fn splits_documents_on_whole_lines() {
        let docs = scan(TEXT).unwrap();
        assert_eq!(
            &TEXT[docs[1].start..docs[1].end],
            "---\nmetadata:\n  name: second\n"
        );
        assert_eq!(docs[1].first_line, 9);
        assert_eq!(
            docs[1].locate("metadata.name"),
            Some(Loc {
                line: 11,
                column: 3
            })
        );
        assert!(TEXT[docs[0].start..docs[0].end].starts_with("# leading comment"));
    }

    #[test]
    fn refuses_pathological_nesting() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let err = scan(&deep).unwrap_err();
        assert!(err.message.contains("nesting"), "{}", err.message);
    }
}
