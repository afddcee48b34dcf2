//! `hangar run`: the operator's main job.

use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{Global, LogFormat, SettingsFlags};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    settings: SettingsFlags,
}

pub fn run(args: RunArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let settings = args.settings.load(global)?;
    init_logging(global.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let ha = hangar::runtime::lease::from_settings(&settings).await?;
        let mut clouds =
            hangar::runtime::clouds::AwsClouds::new(&settings.owner, &settings.state_dir)
                .template_version_ttl(settings.template_version_ttl.get());
        if let Some(ha) = &ha {
            // Every mutating call asks the lease first; the lease table's
            // calls show on /metrics with the others.
            clouds = clouds.fenced(std::sync::Arc::new(ha.leadership.clone()));
            if let Some(calls) = &ha.calls {
                clouds = clouds.with_calls(calls.clone());
            }
        }
        let clouds = std::sync::Arc::new(clouds);
        hangar::runtime::run_with(settings, None, clouds.clone(), Some(clouds), ha, shutdown)
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `HANGAR_LOG` (or `RUST_LOG`) filters, default `info`.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// SIGTERM or SIGINT: stop taking work and let in-flight steps finish.
async fn stop_on_signal(shutdown: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("signal received: shutting down");
    shutdown.cancel();
}
