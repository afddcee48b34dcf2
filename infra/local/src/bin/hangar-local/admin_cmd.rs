//! `capacity`, `calls`, `block`, `unblock`: the running stack's gateway
//! controls, over its admin API (see `hangar_local::gateway::admin`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use hangar_local::gateway::{admin, ApiCalls, Capacity};

use crate::rundir::RunDir;

fn endpoint(root: &Path) -> Result<String> {
    match RunDir::new(root)?.read_stack()? {
        Some(stack) => Ok(stack.aws_endpoint),
        None => bail!("no local cloud is up (`infra/local/cloud up`)"),
    }
}

/// `capacity [SUBNET on|off|unsupported]`.
pub fn capacity(root: &Path, subnet: Option<String>, state: Option<String>) -> Result<ExitCode> {
    let endpoint = endpoint(root)?;
    if let (Some(subnet), Some(state)) = (&subnet, &state) {
        let capacity = Capacity::parse(state).with_context(|| {
            format!("`{state}`: on (available), off (insufficient) or unsupported")
        })?;
        admin::request(
            &endpoint,
            "POST",
            &format!("capacity/{subnet}/{}", capacity.as_str()),
        )?;
        println!("{subnet}: {}", capacity.as_str());
        return Ok(ExitCode::SUCCESS);
    }
    if subnet.is_some() {
        bail!("give the state too: capacity SUBNET on|off|unsupported");
    }
    let listed = admin::request(&endpoint, "GET", "capacity")?;
    let listed: std::collections::BTreeMap<String, Capacity> =
        serde_json::from_str(&listed).context("reading the gateway's capacity list")?;
    if listed.is_empty() {
        println!("every subnet has capacity");
    }
    for (subnet, capacity) in listed {
        println!("{subnet}: {}", capacity.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// `calls [--json]`.
pub fn calls(root: &Path, json: bool) -> Result<ExitCode> {
    let body = admin::request(&endpoint(root)?, "GET", "calls")?;
    if json {
        println!("{}", body.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    let calls: ApiCalls = serde_json::from_str(&body).context("reading the gateway's counters")?;
    println!(
        "{:<24} {:<48} {:>7} {:>9} {:>7} {:>7}",
        "access key", "action", "calls", "throttled", "errors", "blocked"
    );
    for (key, actions) in &calls.by_key {
        for (action, c) in actions {
            println!(
                "{key:<24} {action:<48} {:>7} {:>9} {:>7} {:>7}",
                c.calls, c.throttled, c.errors, c.blocked
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `block KEY SERVICE` / `unblock KEY SERVICE`.
pub fn block(root: &Path, block: bool, key: &str, service: &str) -> Result<ExitCode> {
    let verb = if block { "block" } else { "unblock" };
    admin::request(&endpoint(root)?, "POST", &format!("{verb}/{key}/{service}"))?;
    println!(
        "{service} calls signed with {key}: {}",
        if block {
            "connections reset"
        } else {
            "pass again"
        }
    );
    Ok(ExitCode::SUCCESS)
}
