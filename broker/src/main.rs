//! `warren-broker`: parses configuration and runs a node, or runs one of the probe
//! subcommands against a running node. Everything else is in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use warren_broker::config::{Check, Cli, ClientArgs, ClusterAction, Command, Config};
use warren_broker::{Broker, management, metrics, server};

/// How long a clustered node waits to catch up with the cluster's metadata before it serves
/// AMQP clients anyway.
const METADATA_WAIT: Duration = Duration::from_secs(60);

/// Colours only for a person at a terminal: not in files, pipes or `kubectl logs`, and never
/// with `NO_COLOR` set (<https://no-color.org>).
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(command) = cli.command.take() {
        return run_command(command, cli);
    }
    let config = match Config::resolve(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-broker: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(colour_logs())
        .with_writer(std::io::stderr)
        .init();
    // One TLS crypto provider for the whole process (rustls cannot choose when a build links
    // several).
    warren_broker::links::connect::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    // The handler first: a SIGTERM that arrives while the node starts still stops it cleanly
    // (without one, the default action would kill the process on the spot).
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| tracing::error!("cannot listen for SIGTERM: {e}"))
        .ok();
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
    // The HTTPS listeners (management, Prometheus): the node's certificate, no client CA.
    let https = match config.https_files() {
        Some(files) => Some(warren_broker::https::acceptor(&files).map_err(|e| e.to_string())?),
        None => None,
    };
    let bind = |addr: Option<std::net::SocketAddr>| async move {
        match addr {
            Some(addr) => TcpListener::bind(addr)
                .await
                .map(Some)
                .map_err(|e| format!("cannot listen on {addr}: {e}")),
            None => Ok(None),
        }
    };
    let management = bind(config.management_listen).await?;
    let management_tls = bind(config.management_tls_listen).await?;
    let prometheus = bind(config.prometheus_listen).await?;
    let prometheus_tls = bind(config.prometheus_tls_listen).await?;
    let cluster_secret = config.cluster_secret()?;
    let cluster_listener = bind(config.cluster_listen).await?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        default_user = %config.default_user,
        "starting Warren {}",
        env!("CARGO_PKG_VERSION")
    );
    let broker = Broker::new(config);
    tracing::info!(
        memory_limit = broker.memory_limit_bytes(),
        physical_memory = warren_broker::resources::physical_memory_bytes(),
        cgroup_memory_limit =
            warren_broker::resources::cgroup_memory_limit(std::path::Path::new("/")),
        "memory high watermark set"
    );
    broker
        .recover()
        .map_err(|e| format!("cannot recover from the data directory: {e}"))?;
    tokio::spawn(warren_broker::resources::monitor(
        std::sync::Arc::downgrade(&broker),
    ));
    let https_listener = |listener: TcpListener| match &https {
        Some(acceptor) => warren_broker::https::TlsListener::new(listener, acceptor.clone())
            .map_err(|e| format!("HTTPS listener: {e}")),
        None => Err("an HTTPS listener without the TLS files".to_owned()),
    };
    if let Some(listener) = management {
        tokio::spawn(management::run(
            broker.clone(),
            listener,
            std::future::pending(),
        ));
    }
    if let Some(listener) = management_tls {
        tokio::spawn(management::run_tls(
            broker.clone(),
            https_listener(listener)?,
            std::future::pending(),
        ));
    }
    if let Some(listener) = prometheus {
        let metrics_broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::run(metrics_broker, listener, std::future::pending()).await {
                tracing::error!("Prometheus listener failed: {e}");
            }
        });
    }
    if let Some(listener) = prometheus_tls {
        let listener = https_listener(listener)?;
        let metrics_broker = broker.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::run(metrics_broker, listener, std::future::pending()).await {
                tracing::error!("Prometheus HTTPS listener failed: {e}");
            }
        });
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let (Some(listener), Some(secret)) = (cluster_listener, cluster_secret) {
        if let Ok(addr) = listener.local_addr() {
            broker.register_listener("clustering", addr);
        }
        broker.start_cluster(listener, secret).await?;
        broker.start_metadata().await?;
        tracing::info!(
            peers = ?broker.config.cluster_peers,
            "inter-node listener up; joining the cluster"
        );
        // AMQP clients are served once this node knows the cluster's queues: before, a
        // publish to a queue it had not heard of yet would be unroutable, dropped and
        // confirmed.
        if !broker.wait_metadata_caught_up(METADATA_WAIT).await {
            tracing::warn!(
                "not caught up with the cluster's metadata after {METADATA_WAIT:?} (no \
                 majority reachable?); serving AMQP clients with what this node knows"
            );
        }
    }
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
    if broker.config.default_user_sync {
        tokio::spawn(warren_broker::definitions::keep_default_user_synced(
            broker.clone(),
        ));
    }
    // Federation links and shovels start once the AMQP listeners are bound (links to
    // `amqp://`, the node itself, connect to them).
    warren_broker::links::start(&broker);
    let signal = wait_for_signal(term).await;
    tracing::info!("{signal} received; shutting down");
    let _ = stop.send(true);
    while servers.join_next().await.is_some() {}
    // A clean stop: links settle what they have in flight, clients get the confirms for what
    // the node took before their connection is closed (320 CONNECTION_FORCED); then everything
    // the message log holds is written and synced before the process exits 0.
    broker.shutdown(Duration::from_secs(10)).await;
    broker.close_store();
    tracing::info!("shutdown complete");
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM (what `kill` and Kubernetes send); returns which.
async fn wait_for_signal(term: Option<tokio::signal::unix::Signal>) -> &'static str {
    let term = async {
        match term {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term => "SIGTERM",
    }
}

/// A subcommand: one request (or two) to the node's management API. Exit 0 on success, 1 with
/// one line on stderr otherwise.
fn run_command(command: Command, cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warren-broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command_main(command, cli)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("warren-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn command_main(command: Command, cli: Cli) -> Result<String, String> {
    use warren_broker::probe;
    let args = match &command {
        Command::Check {
            check: Check::Ready { client },
        } => client,
        Command::Drain { client, .. } => client,
        Command::Cluster {
            action: ClusterAction::Forget { client, .. },
        } => client,
    };
    let default_timeout = match &command {
        Command::Drain { .. } => 30.0,
        _ => 5.0,
    };
    let (client, user, timeout) = client_for(args, default_timeout, cli)?;
    match command {
        Command::Check {
            check: Check::Ready { .. },
        } => {
            let node = probe::within(timeout, &client, probe::check_ready(&client, &user))
                .await
                .map_err(|e| format!("not ready: {e}"))?;
            Ok(format!("ready: node {node}\n"))
        }
        Command::Cluster {
            action: ClusterAction::Forget { node, .. },
        } => {
            let answer = probe::within(timeout, &client, probe::forget(&client, &user, &node))
                .await
                .map_err(|e| format!("forget failed: {e}"))?;
            let mut out = format!("{node} removed from the cluster\n");
            let queues = answer["queues_deleted"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for q in queues {
                out.push_str(&format!(
                    "queue '{}' in vhost '{}' lived on it and was deleted\n",
                    q["name"].as_str().unwrap_or("?"),
                    q["vhost"].as_str().unwrap_or("?")
                ));
            }
            for q in answer["queues_shrunk"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                out.push_str(&format!(
                    "replicated queue '{}' in vhost '{}': its replica there removed ({})\n",
                    q["name"].as_str().unwrap_or("?"),
                    q["vhost"].as_str().unwrap_or("?"),
                    q["result"].as_str().unwrap_or("?")
                ));
            }
            Ok(out)
        }
        Command::Drain { end, json, .. } => {
            let report = probe::within(timeout, &client, probe::drain(&client, &user, end))
                .await
                .map_err(|e| format!("drain failed: {e}"))?;
            Ok(if json {
                format!("{report:#}\n")
            } else {
                probe::describe_drain(&report)
            })
        }
    }
}

/// The management API client for a subcommand: flags first, then what the node itself would
/// use (management-listen and the default user, from flags, environment and config file).
fn client_for(
    args: &ClientArgs,
    default_timeout: f64,
    cli: Cli,
) -> Result<(warren_broker::probe::Client, String, Duration), String> {
    let secs = args.timeout.unwrap_or(default_timeout);
    let timeout = Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| format!("--timeout {secs} is not a positive number of seconds"))?;
    let need_config =
        args.management_url.is_none() || args.user.is_none() || args.password.is_none();
    let config = if need_config {
        Some(Config::resolve(cli).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let url = match (&args.management_url, &config) {
        (Some(u), _) => u.clone(),
        (None, Some(c)) => match (c.management_listen, c.management_tls_listen) {
            (Some(addr), _) => warren_broker::probe::local_url(addr),
            (None, Some(addr)) => warren_broker::probe::local_https_url(addr),
            (None, None) => "http://127.0.0.1:15672".to_owned(),
        },
        (None, None) => "http://127.0.0.1:15672".to_owned(),
    };
    let user = args
        .user
        .clone()
        .or_else(|| config.as_ref().map(|c| c.default_user.clone()))
        .unwrap_or_else(|| "guest".into());
    let password = args
        .password
        .clone()
        .or_else(|| config.as_ref().map(|c| c.default_pass.clone()))
        .unwrap_or_else(|| "guest".into());
    let ca = config.as_ref().and_then(|c| c.tls_ca_file.as_deref());
    let client = warren_broker::probe::Client::with_ca(&url, &user, &password, ca)?;
    Ok((client, user, timeout))
}
