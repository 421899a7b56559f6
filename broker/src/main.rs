//! `warren-broker`: parses configuration and runs a node. Everything else is in the library.

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use warren_broker::config::{Cli, Config};
use warren_broker::{Broker, management, metrics, server};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::resolve(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-broker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-broker: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-broker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        format!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let listener = TcpListener::bind(config.amqp_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.amqp_listen))?;
    let management = TcpListener::bind(config.management_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.management_listen))?;
    let prometheus = TcpListener::bind(config.prometheus_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.prometheus_listen))?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        default_user = %config.default_user,
        "starting Warren {}",
        env!("CARGO_PKG_VERSION")
    );
    let broker = Broker::new(config);
    broker
        .recover()
        .map_err(|e| format!("cannot recover from the data directory: {e}"))?;
    tokio::spawn(warren_broker::resources::monitor(
        std::sync::Arc::downgrade(&broker),
    ));
    tokio::spawn(management::run(
        broker.clone(),
        management,
        std::future::pending(),
    ));
    let metrics_broker = broker.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::run(metrics_broker, prometheus, std::future::pending()).await {
            tracing::error!("Prometheus listener failed: {e}");
        }
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    server::run(broker, listener, shutdown).await;
    Ok(())
}
