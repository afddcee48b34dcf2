//! The JSON Schema of a `Cluster`, generated from the Rust types so the two
//! cannot drift. `crds/schema/cluster.json` is the checked-in copy; a test
//! fails when it is stale (regenerate with `UPDATE_SCHEMA=1 cargo test -p hangar-crds`).

use crate::spec::Cluster;

/// Where editors find the schema, relative to the repository root.
pub const SCHEMA_PATH: &str = "crds/schema/cluster.json";

pub fn cluster_schema() -> schemars::Schema {
    let mut schema = schemars::schema_for!(Cluster);
    schema.insert(
        "$id".to_string(),
        "https://hangar.dev/schema/v1alpha1/cluster.json".into(),
    );
    schema
}

/// The schema as stable, pretty-printed JSON with a trailing newline.
pub fn cluster_schema_json() -> String {
    let mut s =
        serde_json::to_string_pretty(&cluster_schema()).expect("a schema always serializes");
    s.push('\n');
    s
}

/// The spec reference as a Markdown table, generated from the schema so the
/// README can never document a field that does not exist (or miss one).
pub fn reference_markdown() -> String {
    let schema = serde_json::to_value(cluster_schema()).expect("a schema is JSON");
    let mut rows = Vec::new();
    walk(&schema, &schema, "", &mut rows);
    let mut out = String::from("| field | type | default | description |\n|---|---|---|---|\n");
    for row in rows {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            row.path, row.ty, row.default, row.description
        ));
    }
    out
}

struct Row {
    path: String,
    ty: String,
    default: String,
    description: String,
}

type Json = serde_json::Value;

fn resolve<'a>(root: &'a Json, node: &'a Json) -> &'a Json {
    // `Option<T>` is `anyOf: [T, null]`: document T.
    if let Some(options) = node.get("anyOf").and_then(Json::as_array) {
        if let Some(inner) = options
            .iter()
            .find(|o| o.get("type").and_then(Json::as_str) != Some("null"))
        {
            return resolve(root, inner);
        }
    }
    match node.get("$ref").and_then(Json::as_str) {
        Some(r) => r
            .strip_prefix("#/$defs/")
            .and_then(|name| root["$defs"].get(name))
            .unwrap_or(node),
        None => node,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// A short type label: `string`, `integer`, `duration`, `list of string`, `a | b`.
fn type_label(root: &Json, node: &Json) -> String {
    if node.get("$ref").and_then(Json::as_str) == Some("#/$defs/Duration") {
        return "duration".into();
    }
    let node = resolve(root, node);
    if let Some(values) = node.get("enum").and_then(Json::as_array) {
        return values
            .iter()
            .filter_map(Json::as_str)
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    if let Some(options) = node.get("oneOf").and_then(Json::as_array) {
        let consts: Vec<String> = options
            .iter()
            .filter_map(|o| {
                o.get("const")
                    .and_then(Json::as_str)
                    .map(|v| format!("`{v}`"))
            })
            .collect();
        if consts.len() == options.len() {
            return consts.join(" \\| ");
        }
        let keys: Vec<String> = options
            .iter()
            .filter_map(|o| {
                o.get("required")?
                    .get(0)?
                    .as_str()
                    .map(|k| format!("`{k}`"))
            })
            .collect();
        return format!("one of {}", keys.join(", "));
    }
    match &node["type"] {
        Json::String(t) if t == "array" => format!("list of {}", type_label(root, &node["items"])),
        Json::String(t) if t == "object" && node.get("properties").is_none() => {
            match node.get("additionalProperties") {
                Some(v @ Json::Object(_)) => format!("map of {}", type_label(root, v)),
                _ => "object".into(),
            }
        }
        Json::String(t) => t.clone(),
        Json::Array(ts) => ts
            .iter()
            .filter_map(Json::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" \\| "),
        _ => "object".into(),
    }
}

fn walk(root: &Json, node: &Json, path: &str, rows: &mut Vec<Row>) {
    let node = resolve(root, node);
    if let Some(options) = node.get("oneOf").and_then(Json::as_array) {
        for option in options {
            walk(root, option, path, rows);
        }
        return;
    }
    let Some(props) = node.get("properties").and_then(Json::as_object) else {
        return;
    };
    let required: Vec<&str> = node
        .get("required")
        .and_then(Json::as_array)
        .map(|r| r.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();
    for (name, prop) in props {
        let p = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        let target = resolve(root, prop);
        let is_duration = prop.get("$ref").and_then(Json::as_str) == Some("#/$defs/Duration");
        let description = prop
            .get("description")
            .or_else(|| {
                if is_duration {
                    None
                } else {
                    target.get("description")
                }
            })
            .and_then(Json::as_str)
            .map(one_line)
            .unwrap_or_default();
        let default = match prop.get("default") {
            _ if required.contains(&name.as_str()) => "required".to_string(),
            Some(Json::Object(_)) | Some(Json::Array(_)) | None => String::new(),
            Some(Json::String(s)) => format!("`{s}`"),
            Some(v) => format!("`{v}`"),
        };
        rows.push(Row {
            path: p.clone(),
            ty: type_label(root, prop),
            default,
            description,
        });
        let items = if target.get("type").and_then(Json::as_str) == Some("array") {
            Some(format!("{p}[]"))
        } else {
            None
        };
        match items {
            Some(item_path) => walk(root, &target["items"], &item_path, rows),
            None => walk(root, prop, &p, rows),
        }
    }
}
