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
