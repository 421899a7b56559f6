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
    // TLS files are read before anything listens: a bad file stops the start with its name.
    let tls = match config.tls_files() {
        Some(files) => Some(warren_broker::tls::acceptor(&files).map_err(|e| e.to_string())?),
        None => None,
    };
    let listener = match config.amqp_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let tls_listener = match (config.amqps_listen, tls) {
        (Some(addr), Some(acceptor)) => Some((
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
            acceptor,
        )),
        _ => None,
    };
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
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(listener) = listener {
        servers.spawn(server::run(
            broker.clone(),
            listener,
            until_stopped(stopped.clone()),
        ));
    }
    if let Some((listener, acceptor)) = tls_listener {
        servers.spawn(server::run_tls(
            broker.clone(),
            listener,
            acceptor,
            until_stopped(stopped.clone()),
        ));
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    while servers.join_next().await.is_some() {}
    Ok(())
}
