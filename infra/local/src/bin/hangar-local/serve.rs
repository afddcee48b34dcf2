//! `hangar-local serve`: the quickstart's daemon. Runs the host manager,
//! the LB and the metrics publisher for the stack in the run directory
//! until SIGTERM/SIGINT, then stops every node it runs before exiting.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use hangar_local::aws::Clients;
use hangar_local::services::{ServiceOptions, Services};
use hangar_local::slot::{Slot, SlotLease};
use tokio::signal::unix::{signal, SignalKind};

use crate::rundir::{write_json, DaemonStatus, RunDir};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The slot lock inherited from `up` (held for the daemon's whole life).
    #[arg(long)]
    lock_fd: i32,
}

pub fn run(root: &Path, args: ServeArgs) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("hangar_local=info")),
        )
        .with_ansi(false)
        .init();
    let run = RunDir::new(root)?;
    let stack = run
        .read_stack()?
        .context("no stack.json: the daemon is started by `hangar-local up`")?;
    let slot = Slot::new(stack.slot)?;
    let _lease = SlotLease::inherit(slot, args.lock_fd)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hangar-local-serve")
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(serve(&run, &stack, slot))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(run: &RunDir, stack: &crate::rundir::Stack, slot: Slot) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let clients = Clients::connect(&stack.endpoint, &stack.region).await;
    let debian = match stack.nodes {
        hangar_local::NodeKind::Debian { image } => {
            let image =
                tokio::task::spawn_blocking(move || hangar_local::debian::Image::ensure(image))
                    .await
                    .context("finding the node image")??;
            Some(hangar_local::debian::DebianOptions::new(
                image,
                slot.bridged(),
                run.debian(),
            ))
        }
        hangar_local::NodeKind::Lite => None,
    };
    let services = Services::start(
        &clients,
        &stack.seeded,
        ServiceOptions {
            slot,
            nodes_dir: run.nodes(),
            authorized_key: stack.public_key.clone(),
            // A restarted daemon keeps the nodes its predecessor left running.
            adopt: true,
            host_poll: stack.host_poll,
            lb_listen: slot.lb_addr(),
            gateway_listen: slot.gateway_addr(),
            moto_endpoint: stack.endpoint.clone(),
            target_poll: stack.target_poll,
            health: stack.health,
            metrics_interval: stack.metrics_interval,
            semantics: stack.semantics.clone(),
            debian,
        },
    )
    .await?;
    tracing::info!(pid = std::process::id(), "daemon ready");
    let pid = std::process::id();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let status = DaemonStatus {
            pid,
            snapshot: services.snapshot(),
        };
        if let Err(e) = write_json(&run.status(), &status) {
            tracing::warn!(error = %e, "writing status.json failed");
        }
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {}
        }
    }
    tracing::info!("stopping: nodes, LB, metrics");
    services.shutdown().await;
    let _ = std::fs::remove_file(run.status());
    tracing::info!("stopped");
    Ok(())
}
