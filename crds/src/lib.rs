//! The hangar `Cluster` spec.
//!
//! - [`spec`]: the types, exactly as people write them in YAML (camelCase,
//!   unknown fields rejected, defaults spelled out);
//! - [`validate`]: the rules types cannot express, each tied to a field path;
//! - [`load`]: reading spec files and directories, turning every problem into
//!   a `FILE:LINE:COL: field.path: message` line without hiding good specs;
//! - [`schema`]: the JSON Schema editors and CI use, generated from the types.

pub mod artifact;
pub mod duration;
pub mod edit;
pub mod load;
pub mod schedule;
pub mod schema;
mod source_map;
pub mod spec;
pub mod validate;

pub use artifact::ArtifactSource;
pub use duration::Duration;
pub use load::{
    load_dir, load_dir_reusing, load_file, load_str, LoadError, LoadReport, LoadedCluster, Problem,
};
pub use spec::*;
