//! Command-line interface. Exit codes: 0 success, 1 "the input has
//! problems" (invalid specs), 2 hangar itself could not do its job.

mod init;
mod plan;
mod release;
mod rollout;
mod run;
mod status;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hangar::runtime::settings::{Overrides, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    about = "Run plain VMs the way Kubernetes runs pods"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Operator settings file (TOML). Environment (HANGAR_*) and flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Settings flags shared by the commands that need operator settings.
#[derive(Debug, Default, Args)]
pub struct SettingsFlags {
    /// Directory of Cluster specs, or a git source
    /// `git+ssh://host/repo.git//dir?ref=main` (also git+https, git+file)
    /// [env: HANGAR_SPECS]
    #[arg(long, value_name = "DIR|GIT")]
    pub specs: Option<String>,
    /// State directory [env: HANGAR_STATE_DIR]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// HTTP listen address [env: HANGAR_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Operator id, stamped as the hangar:owner tag [env: HANGAR_OWNER]
    #[arg(long)]
    pub owner: Option<String>,
    /// Clusters reconciled concurrently [env: HANGAR_CONCURRENCY]
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Lease between operators of this owner id: `flock` (one host, the
    /// default) or `dynamodb:TABLE` (a leader and standbys on any hosts)
    /// [env: HANGAR_LEASE]
    #[arg(long, value_name = "LEASE")]
    pub lease: Option<String>,
    /// How long a standby waits for an unrenewed lease before taking
    /// over; default 15s [env: HANGAR_LEASE_DURATION]
    #[arg(long, value_name = "DURATION")]
    pub lease_duration: Option<hangar_crds::Duration>,
    /// How long the leader keeps acting after its last successful renewal;
    /// default 10s [env: HANGAR_LEASE_RENEW_DEADLINE]
    #[arg(long, value_name = "DURATION")]
    pub lease_renew_deadline: Option<hangar_crds::Duration>,
    /// How often the leader renews and a standby looks; default 2s
    /// [env: HANGAR_LEASE_RETRY_PERIOD]
    #[arg(long, value_name = "DURATION")]
    pub lease_retry_period: Option<hangar_crds::Duration>,
    /// This process's identity in the lease; default host-pid-random
    /// [env: HANGAR_LEASE_HOLDER]
    #[arg(long, value_name = "NAME")]
    pub lease_holder: Option<String>,
}

impl SettingsFlags {
    fn load(&self, global: &Global) -> anyhow::Result<Settings> {
        let overrides = Overrides {
            specs: self.specs.clone(),
            state_dir: self.state_dir.clone(),
            listen: self.listen,
            owner: self.owner.clone(),
            concurrency: self.concurrency,
            lease: self.lease.clone(),
            lease_duration: self.lease_duration,
            lease_renew_deadline: self.lease_renew_deadline,
            lease_retry_period: self.lease_retry_period,
            lease_holder: self.lease_holder.clone(),
        };
        Ok(Settings::load(global.config.as_deref(), &overrides)?)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check spec files: exit 0 when all are valid, else one line per problem
    /// (FILE:LINE:COL: field.path: message) and exit 1.
    Validate {
        /// Spec files or directories (searched for *.yaml / *.yml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the Cluster JSON Schema.
    Schema,
    /// Write a starter Cluster spec from the prerequisites stack's outputs
    /// (infra/aws/hangar-prerequisites.yaml), checked by `validate`'s loader.
    Init(init::InitArgs),
    /// Show what the planner decides for each cluster (offline: time and
    /// traffic are given on the command line).
    Plan(plan::PlanArgs),
    /// Run the operator: keep every cluster in the spec directory in shape
    /// until SIGTERM/SIGINT.
    Run(run::RunArgs),
    /// Show what a running operator reports (clusters, nodes, activity).
    Status(status::StatusArgs),
    /// Point a cluster's spec at a new release: edits its file in place
    /// (comments and formatting kept), computing the sha256 from the
    /// artifact unless given. Exit 1: bad input; 2: artifact unreadable.
    Release(release::ReleaseArgs),
    /// Follow a rollout on a running operator.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { paths } => Ok(validate::run(&paths)),
        Command::Schema => {
            print!("{}", hangar_crds::schema::cluster_schema_json());
            Ok(ExitCode::SUCCESS)
        }
        Command::Init(args) => init::run(args),
        Command::Plan(args) => plan::run(args, &cli.global),
        Command::Run(args) => run::run(args, &cli.global),
        Command::Status(args) => status::run(args, &cli.global),
        Command::Release(args) => release::run(args),
        Command::Rollout(cmd) => rollout::run(cmd, &cli.global),
    }
}
