//! A small element tree over quick-xml, for rewriting moto's EC2 answers
//! (drop an instance, replace a `tagSet`) without re-modelling EC2's
//! schema. Text stays as it was escaped on the wire; only values the
//! gateway compares are unescaped, so whatever it does not touch is written
//! back byte for byte.

use quick_xml::events::Event;
use quick_xml::Reader;

#[derive(Debug, thiserror::Error)]
#[error("malformed XML: {0}")]
pub struct XmlError(String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    /// Escaped character data, as on the wire.
    Text(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    /// The attributes as written (` xmlns="…"`), kept verbatim.
    pub attrs: String,
    pub children: Vec<Node>,
}

/// A parsed document: its declaration (if any) and root element.
#[derive(Clone, Debug)]
pub struct Document {
    decl: Option<String>,
    pub root: Element,
}

impl Document {
    pub fn parse(xml: &str) -> Result<Document, XmlError> {
        let mut reader = Reader::from_str(xml);
        let mut decl = None;
        let mut stack: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| XmlError(format!("at byte {}: {e}", reader.buffer_position())))?;
            match event {
                Event::Decl(d) => decl = Some(format!("<?{}?>", &*d)),
                Event::Start(start) => stack.push(Element {
                    name: start.name().as_ref().to_string(),
                    attrs: start.attributes_raw().to_string(),
                    children: Vec::new(),
                }),
                Event::Empty(start) => {
                    let element = Element {
                        name: start.name().as_ref().to_string(),
                        attrs: start.attributes_raw().to_string(),
                        children: Vec::new(),
                    };
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(Node::Element(element)),
                        None => root = Some(element),
                    }
                }
                Event::End(_) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| XmlError("closing tag without an opening one".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(Node::Element(done)),
                        None => root = Some(done),
                    }
                }
                Event::Text(text) => push_text(&mut stack, &text.into_inner()),
                Event::GeneralRef(r) => push_text(&mut stack, &format!("&{};", &*r)),
                Event::CData(data) => push_text(&mut stack, &quick_xml::escape::escape(&*data)),
                Event::Eof => break,
                Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
            }
        }
        if !stack.is_empty() {
            return Err(XmlError(format!("<{}> is never closed", stack[0].name)));
        }
        let root = root.ok_or_else(|| XmlError("no root element".into()))?;
        Ok(Document { decl, root })
    }

    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        if let Some(decl) = &self.decl {
            out.push_str(decl);
            out.push('\n');
        }
        self.root.write(&mut out);
        out
    }
}

fn push_text(stack: &mut [Element], raw: &str) {
    // Whitespace between top-level nodes has no parent to keep it.
    let Some(parent) = stack.last_mut() else {
        return;
    };
    match parent.children.last_mut() {
        Some(Node::Text(prev)) => prev.push_str(raw),
        _ => parent.children.push(Node::Text(raw.to_string())),
    }
}

impl Element {
    /// A leaf `<name>value</name>`, `value` escaped here.
    pub fn leaf(name: &str, value: &str) -> Element {
        Element {
            name: name.to_string(),
            attrs: String::new(),
            children: vec![Node::Text(quick_xml::escape::escape(value).into_owned())],
        }
    }

    pub fn new(name: &str, children: Vec<Element>) -> Element {
        Element {
            name: name.to_string(),
            attrs: String::new(),
            children: children.into_iter().map(Node::Element).collect(),
        }
    }

    /// The first child element called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.name == name => Some(e),
            _ => None,
        })
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// Keeps only the child elements `keep` says yes to (text stays).
    pub fn retain_elements(&mut self, mut keep: impl FnMut(&mut Element) -> bool) {
        self.children.retain_mut(|n| match n {
            Node::Element(e) => keep(e),
            Node::Text(_) => true,
        });
    }

    /// Replaces the first child called `name` (or appends it).
    pub fn set_child(&mut self, element: Element) {
        match self.child_mut(&element.name) {
            Some(existing) => *existing = element,
            None => self.children.push(Node::Element(element)),
        }
    }

    /// The unescaped text content (`None` when it is not valid escaped text).
    pub fn text(&self) -> Option<String> {
        let mut raw = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                raw.push_str(t);
            }
        }
        quick_xml::escape::unescape(&raw)
            .ok()
            .map(|s| s.into_owned())
    }

    /// The text of the child element `name`.
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).and_then(Element::text)
    }

    fn write(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        out.push_str(&self.attrs);
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for n in &self.children {
            match n {
                Node::Element(e) => e.write(out),
                Node::Text(t) => out.push_str(t),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_what_it_does_not_touch() {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<R xmlns=\"x\"><a>1 &amp; 2</a><b/><c><d>&#65;</d></c></R>";
        let doc = Document::parse(xml).unwrap();
        assert_eq!(doc.to_xml(), xml);
        assert_eq!(doc.root.child_text("a").as_deref(), Some("1 & 2"));
        assert_eq!(
            doc.root.child("c").unwrap().child_text("d").as_deref(),
            Some("A")
        );
    }

    #[test]
    fn edits_and_rejects_broken_input() {
        let mut doc = Document::parse("<R><x>1</x><y>2</y></R>").unwrap();
        doc.root.retain_elements(|e| e.name != "x");
        doc.root.set_child(Element::leaf("z", "<3>"));
        assert_eq!(doc.to_xml(), "<R><y>2</y><z>&lt;3&gt;</z></R>");
        assert!(Document::parse("<R><x></R>").is_err());
        assert!(Document::parse("<R>").is_err());
        assert!(Document::parse("").is_err());
    }
}
