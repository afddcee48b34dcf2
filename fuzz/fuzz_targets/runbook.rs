//! The runbook parser on arbitrary text, then validation and planning
//! (rendering every template, building the remote scripts) of whatever
//! parses: errors, never a panic, and bounded time.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use hangar::effects::runbook::{Facts, Runbook};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(runbook) = Runbook::parse(text, Path::new("/fuzz/runbooks/provision.yaml")) else {
        return;
    };
    let _ = runbook.validate();
    let _ = runbook.display_name();
    let vars = BTreeMap::from([
        ("php_version".to_string(), "8.2".to_string()),
        ("port".to_string(), "8080".to_string()),
    ]);
    let facts = Facts {
        instance_id: "i-0123456789abcdef0".into(),
        private_ip: "127.0.0.2".into(),
        app_root: "/srv/app".into(),
        health_path: "/health".into(),
        health_port: 80,
    };
    let _ = runbook.plan(&vars, &facts);
});
