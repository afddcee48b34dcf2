//! `hangar-local`: the local cloud as a command (`infra/local/cloud` runs it).
//!
//! `up` starts moto, seeds it and starts the `serve` daemon (host manager +
//! LB + metrics) in the background; `down` stops them by PID; `status` says
//! what runs; `load` sends fixed-rate traffic through the LB.

mod admin_cmd;
mod load_cmd;
mod rundir;
mod serve;
mod stack;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hangar-local",
    version,
    about = "hangar's local cloud: emulated AWS, real SSH nodes, a real LB data plane"
)]
struct Cli {
    /// Where the running stack keeps its state, env file, spec and logs.
    #[arg(long, global = true, env = "HANGAR_LOCAL_RUN_DIR", default_value_os_t = rundir::default_root())]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start moto, seed it, start the node manager and the LB (background).
    Up(stack::UpArgs),
    /// Stop everything `up` started, by PID, and remove node state.
    Down,
    /// Show what runs: processes, endpoints, nodes, targets, metrics.
    Status {
        /// Print the daemon's raw status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send GET requests through the LB at a fixed rate.
    Load(load_cmd::LoadArgs),
    /// Make RunInstances into SUBNET fail (off: InsufficientInstanceCapacity,
    /// unsupported: Unsupported) or launch again (on); no arguments: list.
    Capacity {
        subnet: Option<String>,
        /// on | off | unsupported
        state: Option<String>,
    },
    /// API calls through the gateway per access key and action.
    Calls {
        #[arg(long)]
        json: bool,
    },
    /// Reset the connection of every SERVICE call signed with KEY.
    Block {
        key: String,
        /// A SigV4 signing name: dynamodb, ec2, elbv2, s3, cloudwatch.
        service: String,
    },
    /// Undo `block`.
    Unblock { key: String, service: String },
    /// The background daemon `up` starts (not for direct use).
    #[command(hide = true)]
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(&cli.run_dir, args),
        Command::Up(args) => stack::up(&cli.run_dir, args),
        Command::Down => stack::down(&cli.run_dir),
        Command::Status { json } => stack::status(&cli.run_dir, json),
        Command::Load(args) => load_cmd::run(&cli.run_dir, args),
        Command::Capacity { subnet, state } => admin_cmd::capacity(&cli.run_dir, subnet, state),
        Command::Calls { json } => admin_cmd::calls(&cli.run_dir, json),
        Command::Block { key, service } => admin_cmd::block(&cli.run_dir, true, &key, &service),
        Command::Unblock { key, service } => admin_cmd::block(&cli.run_dir, false, &key, &service),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hangar-local: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `10s`, `2m`, `500ms`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 60s, 2m)"))
}
