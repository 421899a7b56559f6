//! Broker configuration: command-line flags, `WARREN_*` environment variables and a TOML file.
//!
//! Precedence is flag > environment > file > default. The file uses the flags' names as keys
//! (`amqp-listen = "0.0.0.0:5672"`) and rejects unknown keys, so a typo in a file the operator
//! wrote is an error at start-up rather than a silently ignored setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// Command-line interface of `warren-broker`. Every flag can also be set through the
/// environment variable named beside it, or in the `--config` file under the flag's name.
#[derive(Debug, Parser, Default)]
#[command(
    name = "warren-broker",
    version,
    about = "Warren: a RabbitMQ-compatible AMQP 0-9-1 broker node",
    long_about = "Warren: a RabbitMQ-compatible AMQP 0-9-1 broker node.\n\n\
        Without a subcommand, runs a node with the settings below. The subcommands are \
        one-shot clients of a running node's management API, for container probes and hooks."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file; keys are the flag names below (e.g. `amqp-listen = "0.0.0.0:5672"`).
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory holding this node's data [default: ./warren-data].
    #[arg(long, env = "WARREN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the plain-TCP AMQP 0-9-1 listener, or `none` to serve AMQP over TLS only
    /// [default: 0.0.0.0:5672].
    #[arg(long, env = "WARREN_AMQP_LISTEN")]
    pub amqp_listen: Option<Listen>,
    /// Address of the AMQP 0-9-1 over TLS (AMQPS) listener, e.g. `0.0.0.0:5671`; needs
    /// --tls-cert-file and --tls-key-file [default: none].
    #[arg(long, env = "WARREN_AMQPS_LISTEN")]
    pub amqps_listen: Option<Listen>,
    /// PEM file with the AMQPS listener's certificate chain, server certificate first
    /// (`tls.crt` of a kubernetes.io/tls Secret).
    #[arg(long, env = "WARREN_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert-file (`tls.key`).
    #[arg(long, env = "WARREN_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM file with CA certificates; when set, AMQPS clients must present a certificate
    /// signed by one of them (mutual TLS) [default: none, no client certificates asked for].
    #[arg(long, env = "WARREN_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Address of the management HTTP API (RabbitMQ-compatible), or `none` to serve it over
    /// HTTPS only [default: 0.0.0.0:15672].
    #[arg(long, env = "WARREN_MANAGEMENT_LISTEN")]
    pub management_listen: Option<Listen>,
    /// Address of the management API over HTTPS, e.g. `0.0.0.0:15671`, with the node's
    /// certificate (--tls-cert-file, --tls-key-file); clients are not asked for a certificate
    /// even when --tls-ca-file is set [default: none].
    #[arg(long, env = "WARREN_MANAGEMENT_TLS_LISTEN")]
    pub management_tls_listen: Option<Listen>,
    /// Address of the Prometheus endpoint, or `none` [default: 0.0.0.0:15692].
    #[arg(long, env = "WARREN_PROMETHEUS_LISTEN")]
    pub prometheus_listen: Option<Listen>,
    /// Address of the Prometheus endpoint over HTTPS, e.g. `0.0.0.0:15691`, with the node's
    /// certificate, as management-tls-listen [default: none].
    #[arg(long, env = "WARREN_PROMETHEUS_TLS_LISTEN")]
    pub prometheus_tls_listen: Option<Listen>,
    /// User created on a fresh node, with all permissions on the default vhost and the
    /// administrator tag; replaces `guest` [default: guest].
    #[arg(long, env = "WARREN_DEFAULT_USER")]
    pub default_user: Option<String>,
    /// Password of the default user [default: guest].
    #[arg(long, env = "WARREN_DEFAULT_PASS", hide_env_values = true)]
    pub default_pass: Option<String>,
    /// `true`: at every start, once its definitions are loaded (clustered: caught up), the
    /// node makes the stored default user match default-user and default-pass: a rotated
    /// password is set, a new user name is created (administrator, all permissions on the
    /// default vhost). The operator sets it, so a rotated Secret takes effect as the pods
    /// roll. Without it the stored user wins, as in RabbitMQ [default: false].
    #[arg(long, env = "WARREN_DEFAULT_USER_SYNC")]
    pub default_user_sync: Option<bool>,
    /// Virtual host created on a fresh node [default: /].
    #[arg(long, env = "WARREN_DEFAULT_VHOST")]
    pub default_vhost: Option<String>,
    /// Users that may connect only from loopback addresses, comma separated [default: guest].
    #[arg(long, env = "WARREN_LOOPBACK_USERS", value_delimiter = ',')]
    pub loopback_users: Option<Vec<String>>,
    /// Heartbeat interval in seconds proposed to clients; 0 disables [default: 60].
    #[arg(long, env = "WARREN_HEARTBEAT")]
    pub heartbeat: Option<u16>,
    /// Largest frame in bytes proposed to clients, at least 4096 [default: 131072].
    #[arg(long, env = "WARREN_FRAME_MAX")]
    pub frame_max: Option<u32>,
    /// Most channels per connection proposed to clients [default: 2047].
    #[arg(long, env = "WARREN_CHANNEL_MAX")]
    pub channel_max: Option<u16>,
    /// Most concurrent client connections; 0 is unlimited [default: 0].
    #[arg(long, env = "WARREN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Largest message body accepted, in bytes [default: 16777216, 16 MiB, as RabbitMQ 4].
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<u64>,
    /// Most consumers on one channel; one more is refused with 530 NOT_ALLOWED, as RabbitMQ's
    /// `consumer_max_per_channel` [default: 16384].
    #[arg(long, env = "WARREN_CONSUMER_MAX_PER_CHANNEL")]
    pub consumer_max_per_channel: Option<u32>,
    /// Most connections the management listener (each of HTTP and HTTPS) serves at once;
    /// more wait in the listen backlog [default: 1024].
    #[arg(long, env = "WARREN_MANAGEMENT_MAX_CONNECTIONS")]
    pub management_max_connections: Option<usize>,
    /// Seconds a client has from the TCP accept to a completed `connection.open` (TLS
    /// handshake included); then the socket is closed. Heartbeats do not extend it
    /// [default: 10].
    #[arg(long, env = "WARREN_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<f64>,
    /// Seconds a connection's socket may accept no bytes of what the node writes (a client
    /// that stopped reading) before the connection is closed and its unacknowledged messages
    /// requeued; twice the negotiated heartbeat if that is longer [default: 30].
    #[arg(long, env = "WARREN_WRITE_TIMEOUT")]
    pub write_timeout: Option<f64>,
    /// This node's name, shown by the management API (`/api/nodes`, `node` fields) and in the
    /// `rabbitmq_node` metric labels [default: warren@$HOSTNAME].
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node_name: Option<String>,
    /// The cluster's name: `cluster_name` in `/api/overview` and `/api/cluster-name`, the
    /// `cluster_name` server property sent to clients, the `rabbitmq_cluster` metric label
    /// [default: the node name].
    #[arg(long, env = "WARREN_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Addresses (`host` or `host:port`, port 25672 by default) of the other nodes of this
    /// node's cluster, comma separated; this node's own address may be among them. Empty: a
    /// single-node broker [default: none].
    #[arg(long, env = "WARREN_CLUSTER_PEERS", value_delimiter = ',')]
    pub cluster_peers: Option<Vec<String>>,
    /// Address of the inter-node listener, or `none` [default: 0.0.0.0:25672 when
    /// cluster-peers is set, else none].
    #[arg(long, env = "WARREN_CLUSTER_LISTEN")]
    pub cluster_listen: Option<Listen>,
    /// The `host:port` other nodes dial to reach this one [default: the host part of
    /// node-name and the port of cluster-listen].
    #[arg(long, env = "WARREN_CLUSTER_ADVERTISE")]
    pub cluster_advertise: Option<String>,
    /// File holding the secret every node of the cluster shares (trailing whitespace is
    /// ignored); nodes prove they know it without sending it. Required with a cluster.
    #[arg(long, env = "WARREN_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// `true`: links between nodes are TLS, both ways authenticated with tls-cert-file and
    /// tls-key-file and verified against tls-ca-file (the certificate's chain; not its host
    /// names, which need not cover the peers' addresses) [default: false].
    #[arg(long, env = "WARREN_CLUSTER_TLS")]
    pub cluster_tls: Option<bool>,
    /// Log filter, e.g. `info` or `warren_broker=debug` [default: info].
    #[arg(long, env = "WARREN_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Memory high watermark as a fraction of the memory available to the node (physical
    /// memory, or the container's cgroup memory limit when lower); above it publishers are
    /// blocked [default: 0.4].
    #[arg(long, env = "WARREN_VM_MEMORY_HIGH_WATERMARK")]
    pub vm_memory_high_watermark: Option<f64>,
    /// Free disk space, in bytes, below which publishers are blocked [default: 50000000].
    #[arg(long, env = "WARREN_DISK_FREE_LIMIT")]
    pub disk_free_limit: Option<u64>,
    /// Message bodies all queues together keep in memory; beyond it the least-soon-needed
    /// bodies are paged out to disk. Bytes (`268435456`, `256MiB`, `1GB`) or a fraction of
    /// the memory high watermark (`0.5`, `50%`) [default: 0.5].
    #[arg(long, env = "WARREN_MESSAGE_MEMORY_BUDGET")]
    pub message_memory_budget: Option<MemoryBudget>,
    /// With SASL EXTERNAL (offered on AMQPS connections that presented a client certificate
    /// verified against --tls-ca-file), the user name is the certificate subject's
    /// `common_name` (CN) or its whole `distinguished_name` in RabbitMQ's form, e.g.
    /// `CN=alice,O=Example,C=GB` [default: common_name].
    #[arg(long, env = "WARREN_SSL_CERT_LOGIN_FROM")]
    pub ssl_cert_login_from: Option<crate::tls::CertLoginFrom>,
    /// With --ssl-cert-login-from subject_alternative_name: the type of subject alternative
    /// name that is the user name: dns, ip, email or uri [default: dns].
    #[arg(long, env = "WARREN_SSL_CERT_LOGIN_SAN_TYPE")]
    pub ssl_cert_login_san_type: Option<crate::tls::SanType>,
    /// With --ssl-cert-login-from subject_alternative_name: which name of that type, from 0
    /// [default: 0].
    #[arg(long, env = "WARREN_SSL_CERT_LOGIN_SAN_INDEX")]
    pub ssl_cert_login_san_index: Option<usize>,
}

/// One-shot clients of the local node's management API (for Kubernetes probes and hooks).
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Cluster membership (`warren-broker cluster forget NODE`).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Health checks of a running node: exit 0 if it passes, 1 with the reason on stderr.
    ///
    /// `warren-broker check ready`: for a readiness probe.
    Check {
        #[command(subcommand)]
        check: Check,
    },
    /// Drain the node and print the queues left on it (for a pod's preStop hook).
    ///
    /// POST /api/warren/drain: the node closes every client connection with
    /// 320 CONNECTION_FORCED and refuses new ones until the drain ends (`--end`, which is
    /// DELETE /api/warren/drain) or the node restarts. Exit 0 once the node is draining.
    Drain {
        #[command(flatten)]
        client: ClientArgs,
        /// End the drain instead: the node accepts connections again.
        #[arg(long)]
        end: bool,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClusterAction {
    /// Remove a stopped node from the cluster for good (`rabbitmqctl forget_cluster_node`):
    /// DELETE /api/nodes/{node} on this node, which tells every running member. The node is
    /// refused from then on until its data directory is wiped.
    Forget {
        /// The node's name, e.g. warren@pod-2.hare-nodes.default.
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum Check {
    /// Ready to serve clients: the virtual hosts check passes and the node is not drained.
    ///
    /// GET /api/health/checks/virtual-hosts answers 200 and /api/nodes does not show
    /// `being_drained`. Resource alarms do not make a node unready (they block publishers and
    /// are reported by /api/health/checks/alarms).
    Ready {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How a subcommand reaches the node's management API. Without flags it uses what the node
/// itself uses: `management-listen` (a wildcard address becomes 127.0.0.1) and the default
/// user, from the same flags, `WARREN_*` environment and `--config` file.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the management API, http:// or https:// [default: http://127.0.0.1:15672,
    /// or from management-listen, or https:// from management-tls-listen when
    /// management-listen is none]. An https:// URL to a loopback address is not verified (the
    /// node talking to itself); another host is verified against tls-ca-file, or the system's
    /// trust anchors.
    #[arg(long, env = "WARREN_MANAGEMENT_URL")]
    pub management_url: Option<String>,
    /// User for the management API [default: the default user: WARREN_DEFAULT_USER,
    /// default-user in the config file, or guest].
    #[arg(long)]
    pub user: Option<String>,
    /// Password of --user [default: the default user's: WARREN_DEFAULT_PASS, default-pass
    /// in the config file, or guest].
    #[arg(long)]
    pub password: Option<String>,
    /// Give up after this many seconds [default: 5; 30 for drain, which waits for
    /// connections to close and for other nodes to take over leadership].
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// The configuration file: the same keys as the flags.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub amqp_listen: Option<Listen>,
    pub amqps_listen: Option<Listen>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub management_listen: Option<Listen>,
    pub management_tls_listen: Option<Listen>,
    pub prometheus_listen: Option<Listen>,
    pub prometheus_tls_listen: Option<Listen>,
    pub default_user: Option<String>,
    pub default_pass: Option<String>,
    pub default_user_sync: Option<bool>,
    pub default_vhost: Option<String>,
    pub loopback_users: Option<Vec<String>>,
    pub heartbeat: Option<u16>,
    pub frame_max: Option<u32>,
    pub channel_max: Option<u16>,
    pub max_connections: Option<usize>,
    pub max_message_size: Option<u64>,
    pub consumer_max_per_channel: Option<u32>,
    pub management_max_connections: Option<usize>,
    pub handshake_timeout: Option<f64>,
    pub write_timeout: Option<f64>,
    pub node_name: Option<String>,
    pub cluster_name: Option<String>,
    pub cluster_peers: Option<Vec<String>>,
    pub cluster_listen: Option<Listen>,
    pub cluster_advertise: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    pub cluster_tls: Option<bool>,
    pub log_level: Option<String>,
    pub vm_memory_high_watermark: Option<f64>,
    pub disk_free_limit: Option<u64>,
    pub message_memory_budget: Option<MemoryBudget>,
    pub ssl_cert_login_from: Option<crate::tls::CertLoginFrom>,
    pub ssl_cert_login_san_type: Option<crate::tls::SanType>,
    pub ssl_cert_login_san_index: Option<usize>,
}

/// Resolved settings the broker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The plain-TCP AMQP listener; `None` serves AMQP over TLS only.
    pub amqp_listen: Option<SocketAddr>,
    /// The AMQPS listener; `None` (the default) serves no TLS.
    pub amqps_listen: Option<SocketAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    /// The management API over HTTP; `None` serves it over HTTPS only.
    pub management_listen: Option<SocketAddr>,
    /// The management API over HTTPS; `None` (the default) serves no HTTPS.
    pub management_tls_listen: Option<SocketAddr>,
    /// The Prometheus endpoint over HTTP; `None` serves none (or HTTPS only).
    pub prometheus_listen: Option<SocketAddr>,
    /// The Prometheus endpoint over HTTPS; `None` (the default) serves no HTTPS.
    pub prometheus_tls_listen: Option<SocketAddr>,
    pub default_user: String,
    pub default_pass: String,
    /// Make the stored default user match the configuration at start (rotation).
    pub default_user_sync: bool,
    pub default_vhost: String,
    pub loopback_users: Vec<String>,
    pub heartbeat: u16,
    pub frame_max: u32,
    pub channel_max: u16,
    pub max_connections: usize,
    pub max_message_size: u64,
    /// Most consumers on one channel (RabbitMQ's `consumer_max_per_channel`, unlimited there;
    /// bounded here so one channel cannot grow without end).
    pub consumer_max_per_channel: u32,
    /// Most connections the management listener serves at once.
    pub management_max_connections: usize,
    /// From accept to `connection.open` done: one deadline for the whole handshake.
    pub handshake_timeout: std::time::Duration,
    /// How long a connection's socket may accept nothing we write before the connection is
    /// closed (at least twice the negotiated heartbeat).
    pub write_timeout: std::time::Duration,
    /// This node's name (`warren@$HOSTNAME` unless configured).
    pub node_name: String,
    /// The cluster's name (the node name unless configured).
    pub cluster_name: String,
    /// Addresses of the cluster's nodes (empty: a single node).
    pub cluster_peers: Vec<String>,
    /// The inter-node listener (25672), when clustered.
    pub cluster_listen: Option<SocketAddr>,
    /// What other nodes dial to reach this one.
    pub cluster_advertise: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    /// Inter-node links over TLS (with the node's certificate, verified against the CA).
    pub cluster_tls: bool,
    pub log_level: String,
    pub vm_memory_high_watermark: f64,
    pub disk_free_limit: u64,
    pub message_memory_budget: MemoryBudget,
    /// Where a SASL EXTERNAL login's user name comes from in the client certificate.
    pub ssl_cert_login_from: crate::tls::CertLoginFrom,
    /// With `SubjectAltName`: the type and index (from 0) of the name used.
    pub ssl_cert_login_san_type: crate::tls::SanType,
    pub ssl_cert_login_san_index: usize,
}

/// `message-memory-budget`: bytes, or a fraction of the memory high watermark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    Bytes(u64),
    Fraction(f64),
}

impl MemoryBudget {
    /// The budget in bytes, for a node whose memory high watermark is `watermark_bytes`.
    pub fn bytes(self, watermark_bytes: u64) -> u64 {
        match self {
            MemoryBudget::Bytes(b) => b,
            MemoryBudget::Fraction(f) => (watermark_bytes as f64 * f) as u64,
        }
    }
}

impl std::str::FromStr for MemoryBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!(
                "'{s}' is neither bytes (like 268435456, 256MiB or 1GB) nor a fraction of the \
                 memory high watermark (like 0.5 or 50%)"
            )
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            return Ok(MemoryBudget::Fraction(p / 100.0));
        }
        if t.contains('.') {
            return t.parse().map(MemoryBudget::Fraction).map_err(|_| bad());
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(digits);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(MemoryBudget::Bytes).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for MemoryBudget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(b) => Ok(MemoryBudget::Bytes(b)),
            Raw::Float(f) => Ok(MemoryBudget::Fraction(f)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A listener setting: an address, or `none` for no listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Addr(SocketAddr),
    None,
}

impl Listen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Addr(a) => Some(a),
            Listen::None => None,
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(Listen::None);
        }
        s.parse().map(Listen::Addr).map_err(|_| {
            format!("'{s}' is neither an address like 0.0.0.0:5672 (or [::]:5672) nor 'none'")
        })
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The inter-node port, as RabbitMQ's distribution port.
pub const CLUSTER_PORT: u16 = 25672;

/// `host:port` from `host` or `host:port` (`[v6]:port` and a bare IPv6 address too).
fn with_default_port(addr: &str, port: u16) -> String {
    if addr.parse::<SocketAddr>().is_ok() {
        return addr.to_owned();
    }
    if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        return format!("[{addr}]:{port}");
    }
    match addr.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() && !addr.ends_with(']') => addr.to_owned(),
        _ => format!("{addr}:{port}"),
    }
}

/// `warren@$HOSTNAME` (`warren@localhost` without `HOSTNAME`), as RabbitMQ's `rabbit@host`.
pub fn default_node_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("warren@{host}")
}

/// A timeout in seconds: positive, at most an hour.
fn seconds(key: &'static str, secs: f64) -> Result<std::time::Duration, ConfigError> {
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(ConfigError::Invalid {
            key,
            message: format!("{secs} is not a number of seconds in (0, 3600]"),
        });
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A node or cluster name: shown in JSON, metric labels and a server property.
fn check_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 255 {
        return Err(ConfigError::Invalid {
            key,
            message: "must be between 1 and 255 bytes long".into(),
        });
    }
    if name.chars().any(char::is_control) {
        return Err(ConfigError::Invalid {
            key,
            message: "must not contain control characters".into(),
        });
    }
    Ok(())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("warren-data"),
            amqp_listen: Some(SocketAddr::from(([0, 0, 0, 0], 5672))),
            amqps_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            management_listen: Some(SocketAddr::from(([0, 0, 0, 0], 15672))),
            management_tls_listen: None,
            prometheus_listen: Some(SocketAddr::from(([0, 0, 0, 0], 15692))),
            prometheus_tls_listen: None,
            default_user: "guest".into(),
            default_pass: "guest".into(),
            default_vhost: "/".into(),
            loopback_users: vec!["guest".into()],
            heartbeat: 60,
            frame_max: 131072,
            channel_max: 2047,
            max_connections: 0,
            max_message_size: 16 * 1024 * 1024,
            consumer_max_per_channel: 16384,
            management_max_connections: 1024,
            handshake_timeout: std::time::Duration::from_secs(10),
            write_timeout: std::time::Duration::from_secs(30),
            node_name: default_node_name(),
            cluster_name: default_node_name(),
            cluster_peers: Vec::new(),
            cluster_listen: None,
            cluster_advertise: None,
            cluster_secret_file: None,
            cluster_tls: false,
            default_user_sync: false,
            log_level: "info".into(),
            vm_memory_high_watermark: 0.4,
            disk_free_limit: 50_000_000,
            message_memory_budget: MemoryBudget::Fraction(0.5),
            ssl_cert_login_from: crate::tls::CertLoginFrom::CommonName,
            ssl_cert_login_san_type: crate::tls::SanType::Dns,
            ssl_cert_login_san_index: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

impl Config {
    /// Merges flags/environment over the file over the defaults, then validates.
    pub fn resolve(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let c = Config {
            data_dir: cli.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            amqp_listen: cli
                .amqp_listen
                .or(file.amqp_listen)
                .map_or(d.amqp_listen, Listen::addr),
            amqps_listen: cli
                .amqps_listen
                .or(file.amqps_listen)
                .map_or(d.amqps_listen, Listen::addr),
            tls_cert_file: cli.tls_cert_file.or(file.tls_cert_file),
            tls_key_file: cli.tls_key_file.or(file.tls_key_file),
            tls_ca_file: cli.tls_ca_file.or(file.tls_ca_file),
            management_listen: cli
                .management_listen
                .or(file.management_listen)
                .map_or(d.management_listen, Listen::addr),
            management_tls_listen: cli
                .management_tls_listen
                .or(file.management_tls_listen)
                .map_or(d.management_tls_listen, Listen::addr),
            prometheus_listen: cli
                .prometheus_listen
                .or(file.prometheus_listen)
                .map_or(d.prometheus_listen, Listen::addr),
            prometheus_tls_listen: cli
                .prometheus_tls_listen
                .or(file.prometheus_tls_listen)
                .map_or(d.prometheus_tls_listen, Listen::addr),
            default_user: cli
                .default_user
                .or(file.default_user)
                .unwrap_or(d.default_user),
            default_pass: cli
                .default_pass
                .or(file.default_pass)
                .unwrap_or(d.default_pass),
            default_vhost: cli
                .default_vhost
                .or(file.default_vhost)
                .unwrap_or(d.default_vhost),
            loopback_users: cli
                .loopback_users
                .or(file.loopback_users)
                .unwrap_or(d.loopback_users),
            heartbeat: cli.heartbeat.or(file.heartbeat).unwrap_or(d.heartbeat),
            frame_max: cli.frame_max.or(file.frame_max).unwrap_or(d.frame_max),
            channel_max: cli
                .channel_max
                .or(file.channel_max)
                .unwrap_or(d.channel_max),
            max_connections: cli
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_message_size: cli
                .max_message_size
                .or(file.max_message_size)
                .unwrap_or(d.max_message_size),
            consumer_max_per_channel: cli
                .consumer_max_per_channel
                .or(file.consumer_max_per_channel)
                .unwrap_or(d.consumer_max_per_channel),
            management_max_connections: cli
                .management_max_connections
                .or(file.management_max_connections)
                .unwrap_or(d.management_max_connections),
            handshake_timeout: match cli.handshake_timeout.or(file.handshake_timeout) {
                None => d.handshake_timeout,
                Some(secs) => seconds("handshake-timeout", secs)?,
            },
            write_timeout: match cli.write_timeout.or(file.write_timeout) {
                None => d.write_timeout,
                Some(secs) => seconds("write-timeout", secs)?,
            },
            cluster_name: cli
                .cluster_name
                .or(file.cluster_name)
                .or_else(|| cli.node_name.clone())
                .or_else(|| file.node_name.clone())
                .unwrap_or(d.cluster_name),
            cluster_listen: match cli.cluster_listen.or(file.cluster_listen) {
                Some(l) => l.addr(),
                None if cli
                    .cluster_peers
                    .as_ref()
                    .or(file.cluster_peers.as_ref())
                    .is_some_and(|p| !p.is_empty()) =>
                {
                    Some(SocketAddr::from(([0, 0, 0, 0], CLUSTER_PORT)))
                }
                None => d.cluster_listen,
            },
            cluster_peers: cli
                .cluster_peers
                .or(file.cluster_peers)
                .unwrap_or(d.cluster_peers)
                .into_iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            cluster_advertise: cli.cluster_advertise.or(file.cluster_advertise),
            cluster_secret_file: cli.cluster_secret_file.or(file.cluster_secret_file),
            cluster_tls: cli
                .cluster_tls
                .or(file.cluster_tls)
                .unwrap_or(d.cluster_tls),
            default_user_sync: cli
                .default_user_sync
                .or(file.default_user_sync)
                .unwrap_or(d.default_user_sync),
            node_name: cli.node_name.or(file.node_name).unwrap_or(d.node_name),
            log_level: cli.log_level.or(file.log_level).unwrap_or(d.log_level),
            vm_memory_high_watermark: cli
                .vm_memory_high_watermark
                .or(file.vm_memory_high_watermark)
                .unwrap_or(d.vm_memory_high_watermark),
            disk_free_limit: cli
                .disk_free_limit
                .or(file.disk_free_limit)
                .unwrap_or(d.disk_free_limit),
            message_memory_budget: cli
                .message_memory_budget
                .or(file.message_memory_budget)
                .unwrap_or(d.message_memory_budget),
            ssl_cert_login_from: cli
                .ssl_cert_login_from
                .or(file.ssl_cert_login_from)
                .unwrap_or(d.ssl_cert_login_from),
            ssl_cert_login_san_type: cli
                .ssl_cert_login_san_type
                .or(file.ssl_cert_login_san_type)
                .unwrap_or(d.ssl_cert_login_san_type),
            ssl_cert_login_san_index: cli
                .ssl_cert_login_san_index
                .or(file.ssl_cert_login_san_index)
                .unwrap_or(d.ssl_cert_login_san_index),
        };
        c.validate()?;
        Ok(c)
    }

    /// The addresses to dial for `cluster-peers`, with the default port where none is given.
    pub fn cluster_peer_addrs(&self) -> Vec<String> {
        self.cluster_peers
            .iter()
            .map(|p| with_default_port(p, CLUSTER_PORT))
            .collect()
    }

    /// What this node advertises to its peers: `cluster-advertise`, else the host of its node
    /// name (`warren@host`) and the inter-node listener's port.
    pub fn cluster_advertise_addr(&self) -> Option<String> {
        let port = self.cluster_listen?.port();
        Some(match &self.cluster_advertise {
            Some(a) => with_default_port(a, port),
            None => {
                let host = self
                    .node_name
                    .split_once('@')
                    .map_or(self.node_name.as_str(), |(_, h)| h);
                with_default_port(host, port)
            }
        })
    }

    /// Reads the cluster secret (trailing whitespace and newlines dropped); an empty or
    /// unreadable file is an error naming it.
    pub fn cluster_secret(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.cluster_secret_file else {
            return Ok(None);
        };
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read cluster-secret-file {}: {e}", path.display()))?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end == 0 {
            return Err(format!("cluster-secret-file {} is empty", path.display()));
        }
        Ok(Some(bytes[..end].to_vec()))
    }

    /// The AMQPS listener's files, when it is on.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        self.amqps_listen?;
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            ca: self.tls_ca_file.clone(),
        })
    }

    /// The node's certificate and key for the HTTPS listeners (management, Prometheus), when
    /// one is on. No CA: like RabbitMQ's management listener (`verify_none`), they never ask
    /// clients for a certificate; HTTP basic auth authenticates.
    pub fn https_files(&self) -> Option<crate::tls::TlsFiles> {
        if self.management_tls_listen.is_none() && self.prometheus_tls_listen.is_none() {
            return None;
        }
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            ca: None,
        })
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let tls_listener = [
            ("amqps-listen", self.amqps_listen),
            ("management-tls-listen", self.management_tls_listen),
            ("prometheus-tls-listen", self.prometheus_tls_listen),
        ]
        .into_iter()
        .find_map(|(name, addr)| addr.map(|_| name));
        if let Some(listener) = tls_listener {
            for (key, v) in [
                ("tls-cert-file", &self.tls_cert_file),
                ("tls-key-file", &self.tls_key_file),
            ] {
                if v.is_none() {
                    return Err(ConfigError::Invalid {
                        key,
                        message: format!("is required when {listener} is set"),
                    });
                }
            }
        } else if !self.cluster_tls {
            // TLS files without a TLS listener are most likely a forgotten amqps-listen.
            for (key, v) in [
                ("tls-cert-file", &self.tls_cert_file),
                ("tls-key-file", &self.tls_key_file),
                ("tls-ca-file", &self.tls_ca_file),
            ] {
                if v.is_some() {
                    return Err(ConfigError::Invalid {
                        key,
                        message: "is set but no TLS listener (amqps-listen, \
                                  management-tls-listen, prometheus-tls-listen) is, nor \
                                  cluster-tls"
                            .into(),
                    });
                }
            }
        }
        if self.amqp_listen.is_none() && self.amqps_listen.is_none() {
            return Err(ConfigError::Invalid {
                key: "amqp-listen",
                message: "is none and amqps-listen is not set: the node would accept no \
                          AMQP connections"
                    .into(),
            });
        }
        if self.management_listen.is_none() && self.management_tls_listen.is_none() {
            return Err(ConfigError::Invalid {
                key: "management-listen",
                message: "is none and management-tls-listen is not set: the node would serve \
                          no management API (probes and the operator use it)"
                    .into(),
            });
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.frame_max < crate::codec::FRAME_MIN_SIZE {
            return Err(ConfigError::Invalid {
                key: "frame-max",
                message: format!("{} is below the AMQP minimum of 4096", self.frame_max),
            });
        }
        if !(self.vm_memory_high_watermark > 0.0 && self.vm_memory_high_watermark <= 1.0) {
            return Err(ConfigError::Invalid {
                key: "vm-memory-high-watermark",
                message: format!(
                    "{} is not a fraction of the node's memory in (0, 1]",
                    self.vm_memory_high_watermark
                ),
            });
        }
        match self.message_memory_budget {
            MemoryBudget::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(ConfigError::Invalid {
                    key: "message-memory-budget",
                    message: format!(
                        "{f} is not a fraction of the memory high watermark in (0, 1]"
                    ),
                });
            }
            MemoryBudget::Bytes(b) if b < 1 << 20 => {
                return Err(ConfigError::Invalid {
                    key: "message-memory-budget",
                    message: format!("{b} bytes is below the minimum of 1 MiB"),
                });
            }
            _ => {}
        }
        if self.management_max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "management-max-connections",
                message: "must be at least 1".into(),
            });
        }
        if self.consumer_max_per_channel == 0 {
            return Err(ConfigError::Invalid {
                key: "consumer-max-per-channel",
                message: "must be at least 1".into(),
            });
        }
        if self.channel_max == 0 {
            return Err(ConfigError::Invalid {
                key: "channel-max",
                message: "must be at least 1".into(),
            });
        }
        if self.default_user.is_empty() {
            return Err(ConfigError::Invalid {
                key: "default-user",
                message: "must not be empty".into(),
            });
        }
        self.validate_listeners()?;
        check_name("node-name", &self.node_name)?;
        check_name("cluster-name", &self.cluster_name)?;
        if self.cluster_listen.is_some() && self.cluster_secret_file.is_none() {
            return Err(ConfigError::Invalid {
                key: "cluster-secret-file",
                message: "is required when the node is clustered (cluster-peers or \
                          cluster-listen is set): nodes authenticate each other with it"
                    .into(),
            });
        }
        if self.cluster_tls
            && (self.tls_cert_file.is_none()
                || self.tls_key_file.is_none()
                || self.tls_ca_file.is_none())
        {
            return Err(ConfigError::Invalid {
                key: "cluster-tls",
                message: "needs tls-cert-file, tls-key-file and tls-ca-file: each node shows \
                          its certificate and verifies its peers' against the CA"
                    .into(),
            });
        }
        if !self.cluster_peers.is_empty() && self.cluster_listen.is_none() {
            return Err(ConfigError::Invalid {
                key: "cluster-listen",
                message: "is none but cluster-peers is set: peers could not reach this node".into(),
            });
        }
        if self.max_message_size == 0 || self.max_message_size > 512 * 1024 * 1024 {
            return Err(ConfigError::Invalid {
                key: "max-message-size",
                message: "must be between 1 byte and 512 MiB".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_settings_default_the_port_and_need_a_secret() {
        let cli = Cli::try_parse_from([
            "warren-broker",
            "--node-name",
            "warren@pod-0.w-nodes.ns",
            "--cluster-peers",
            "pod-0.w-nodes.ns.svc, pod-1.w-nodes.ns.svc:25673,10.0.0.3,fd00::1,[fd00::2]:7",
        ])
        .expect("parse");
        let err = Config::resolve(cli).expect_err("no secret");
        assert!(err.to_string().contains("cluster-secret-file"), "{err}");
        let cli = Cli::try_parse_from([
            "warren-broker",
            "--node-name",
            "warren@pod-0.w-nodes.ns",
            "--cluster-peers",
            "pod-0.w-nodes.ns.svc, pod-1.w-nodes.ns.svc:25673,10.0.0.3,fd00::1,[fd00::2]:7",
            "--cluster-secret-file",
            "/nonexistent",
        ])
        .expect("parse");
        let c = Config::resolve(cli).expect("resolve");
        assert_eq!(
            c.cluster_listen,
            Some(SocketAddr::from(([0, 0, 0, 0], 25672)))
        );
        assert_eq!(
            c.cluster_peer_addrs(),
            [
                "pod-0.w-nodes.ns.svc:25672",
                "pod-1.w-nodes.ns.svc:25673",
                "10.0.0.3:25672",
                "[fd00::1]:25672",
                "[fd00::2]:7"
            ]
        );
        assert_eq!(
            c.cluster_advertise_addr().as_deref(),
            Some("pod-0.w-nodes.ns:25672")
        );
        assert!(
            c.cluster_secret()
                .expect_err("unreadable")
                .contains("/nonexistent")
        );
        // A single node has no inter-node listener unless asked for one.
        let c = Config::resolve(Cli::try_parse_from(["warren-broker"]).expect("parse"))
            .expect("resolve");
        assert_eq!(c.cluster_listen, None);
        assert_eq!(c.cluster_advertise_addr(), None);
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("warren-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("warren.toml");
        std::fs::write(&path, "heartbeat = 10\nframe-max = 8192\n").unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            heartbeat: Some(5),
            ..Default::default()
        };
        let c = Config::resolve(cli).unwrap();
        assert_eq!(c.heartbeat, 5);
        assert_eq!(c.frame_max, 8192);
        assert_eq!(c.channel_max, 2047);
        std::fs::write(&path, "hartbeat = 10\n").unwrap();
        let err = Config::resolve(Cli {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("hartbeat"), "{err}");
    }

    #[test]
    fn names_default_to_the_host_and_cluster_follows_node() {
        let c = Config::resolve(Cli::default()).unwrap();
        assert_eq!(c.node_name, default_node_name());
        assert!(c.node_name.starts_with("warren@"));
        assert_eq!(c.cluster_name, c.node_name);

        let c = Config::resolve(Cli {
            node_name: Some("warren@pod-0.warren.ns".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.node_name, "warren@pod-0.warren.ns");
        assert_eq!(c.cluster_name, "warren@pod-0.warren.ns");

        let dir = std::env::temp_dir().join(format!("warren-cfg-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("warren.toml");
        std::fs::write(
            &path,
            "node-name = \"warren@file\"\ncluster-name = \"prod\"\n",
        )
        .unwrap();
        let c = Config::resolve(Cli {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.cluster_name.as_str()),
            ("warren@file", "prod")
        );
        // A node name given as a flag still leaves the file's cluster name in place.
        let c = Config::resolve(Cli {
            config: Some(path),
            node_name: Some("warren@flag".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.node_name.as_str(), c.cluster_name.as_str()),
            ("warren@flag", "prod")
        );

        let err = Config::resolve(Cli {
            cluster_name: Some(String::new()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("cluster-name"), "{err}");
    }

    #[test]
    fn listeners_and_tls_files() {
        let dir = std::env::temp_dir().join(format!("warren-cfg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("warren.toml");
        std::fs::write(
            &path,
            "amqp-listen = \"none\"\namqps-listen = \"0.0.0.0:5671\"\n\
             tls-cert-file = \"/etc/warren/tls/tls.crt\"\n\
             tls-key-file = \"/etc/warren/tls/tls.key\"\n\
             tls-ca-file = \"/etc/warren/tls/ca.crt\"\n",
        )
        .unwrap();
        let c = Config::resolve(Cli {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.amqp_listen, None);
        assert_eq!(c.amqps_listen, Some("0.0.0.0:5671".parse().unwrap()));
        let files = c.tls_files().unwrap();
        assert_eq!(files.cert, PathBuf::from("/etc/warren/tls/tls.crt"));
        assert_eq!(files.ca, Some(PathBuf::from("/etc/warren/tls/ca.crt")));
        // A flag turns the plain listener back on.
        let c = Config::resolve(Cli {
            config: Some(path.clone()),
            amqp_listen: Some("127.0.0.1:5672".parse().unwrap()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.amqp_listen, Some("127.0.0.1:5672".parse().unwrap()));

        // Defaults: plain on 5672, no TLS.
        let c = Config::resolve(Cli::default()).unwrap();
        assert_eq!(c.amqp_listen, Some("0.0.0.0:5672".parse().unwrap()));
        assert!(c.amqps_listen.is_none() && c.tls_files().is_none());

        let err = |cli: Cli| Config::resolve(cli).unwrap_err().to_string();
        let e = err(Cli {
            amqps_listen: Some(Listen::Addr("0.0.0.0:5671".parse().unwrap())),
            tls_key_file: Some("k".into()),
            ..Default::default()
        });
        assert!(e.contains("tls-cert-file") && e.contains("required"), "{e}");
        let e = err(Cli {
            tls_ca_file: Some("ca".into()),
            ..Default::default()
        });
        assert!(
            e.contains("tls-ca-file") && e.contains("amqps-listen"),
            "{e}"
        );
        let e = err(Cli {
            amqp_listen: Some(Listen::None),
            ..Default::default()
        });
        assert!(e.contains("amqp-listen") && e.contains("no"), "{e}");
        assert!("nowhere".parse::<Listen>().unwrap_err().contains("'none'"));
        // HTTPS management and Prometheus: the node's certificate, no client CA.
        let e = err(Cli {
            management_tls_listen: Some(Listen::Addr("0.0.0.0:15671".parse().unwrap())),
            ..Default::default()
        });
        assert!(
            e.contains("tls-cert-file") && e.contains("management-tls-listen"),
            "{e}"
        );
        let e = err(Cli {
            management_listen: Some(Listen::None),
            ..Default::default()
        });
        assert!(
            e.contains("management-listen") && e.contains("management-tls-listen"),
            "{e}"
        );
        std::fs::write(
            &path,
            "management-listen = \"none\"\nmanagement-tls-listen = \"0.0.0.0:15671\"\n\
             prometheus-listen = \"none\"\nprometheus-tls-listen = \"0.0.0.0:15691\"\n\
             tls-cert-file = \"c\"\ntls-key-file = \"k\"\ntls-ca-file = \"ca\"\n",
        )
        .unwrap();
        let c = Config::resolve(Cli {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.management_listen, None);
        assert_eq!(
            c.management_tls_listen,
            Some("0.0.0.0:15671".parse().unwrap())
        );
        assert_eq!(c.prometheus_listen, None);
        assert_eq!(
            c.prometheus_tls_listen,
            Some("0.0.0.0:15691".parse().unwrap())
        );
        assert!(c.tls_files().is_none(), "no AMQPS listener");
        let files = c.https_files().unwrap();
        assert_eq!((files.cert.to_str(), files.ca), (Some("c"), None));
        assert_eq!(Config::default().management_tls_listen, None);
        assert!(Config::default().https_files().is_none());
        std::fs::write(&path, "amqp-listen = \"localhost\"\n").unwrap();
        let e = err(Cli {
            config: Some(path),
            ..Default::default()
        });
        assert!(e.contains("localhost"), "{e}");
    }

    #[test]
    fn message_memory_budget_in_bytes_or_as_a_fraction() {
        let parse = |s: &str| s.parse::<MemoryBudget>();
        assert_eq!(parse("8388608"), Ok(MemoryBudget::Bytes(8 << 20)));
        assert_eq!(parse("256MiB"), Ok(MemoryBudget::Bytes(256 << 20)));
        assert_eq!(parse("1 GB"), Ok(MemoryBudget::Bytes(1_000_000_000)));
        assert_eq!(parse("0.25"), Ok(MemoryBudget::Fraction(0.25)));
        assert_eq!(parse("50%"), Ok(MemoryBudget::Fraction(0.5)));
        assert!(parse("lots").unwrap_err().contains("neither bytes"));
        assert!(parse("12 parsecs").is_err());
        assert!(parse("99999999999999999999GiB").is_err());
        assert_eq!(MemoryBudget::Fraction(0.5).bytes(1000), 500);
        assert_eq!(
            Config::default().message_memory_budget,
            MemoryBudget::Fraction(0.5)
        );

        let dir = std::env::temp_dir().join(format!("warren-cfg-budget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("warren.toml");
        for (text, want) in [
            (
                "message-memory-budget = 16777216\n",
                MemoryBudget::Bytes(16 << 20),
            ),
            ("message-memory-budget = 0.3\n", MemoryBudget::Fraction(0.3)),
            (
                "message-memory-budget = \"64MiB\"\n",
                MemoryBudget::Bytes(64 << 20),
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let c = Config::resolve(Cli {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(c.message_memory_budget, want, "{text}");
        }
        for bad in [
            "message-memory-budget = 1.5\n",
            "message-memory-budget = 1000\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Config::resolve(Cli {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains("message-memory-budget"), "{e}");
        }
    }

    #[test]
    fn ssl_cert_login_from_flag_over_file_over_default() {
        use crate::tls::CertLoginFrom;
        assert_eq!(
            Config::default().ssl_cert_login_from,
            CertLoginFrom::CommonName
        );
        let dir = std::env::temp_dir().join(format!("warren-cfg-certlogin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("warren.toml");
        // The configuration resolved from a file with this text (and `cli`'s other fields).
        let from_file = |text: &str, cli: Cli| {
            std::fs::write(&path, text).unwrap();
            Config::resolve(Cli {
                config: Some(path.clone()),
                ..cli
            })
        };
        let dn = "ssl-cert-login-from = \"distinguished_name\"\n";
        let c = from_file(dn, Cli::default()).unwrap();
        assert_eq!(c.ssl_cert_login_from, CertLoginFrom::DistinguishedName);
        let flag = Cli {
            ssl_cert_login_from: Some(CertLoginFrom::CommonName),
            ..Default::default()
        };
        let c = from_file(dn, flag).unwrap();
        assert_eq!(c.ssl_cert_login_from, CertLoginFrom::CommonName);
        let c = from_file(
            "ssl-cert-login-from = \"subject_alt_name\"\nssl-cert-login-san-type = \"uri\"\nssl-cert-login-san-index = 2\n",
            Cli::default(),
        )
        .unwrap();
        assert_eq!(
            (
                c.ssl_cert_login_from,
                c.ssl_cert_login_san_type,
                c.ssl_cert_login_san_index
            ),
            (CertLoginFrom::SubjectAltName, crate::tls::SanType::Uri, 2)
        );
        let e = from_file("ssl-cert-login-san-type = \"other_name\"\n", Cli::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("other_name is not supported"), "{e}");
        let e = from_file("ssl-cert-login-from = \"subject\"\n", Cli::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ssl-cert-login-from") && e.contains("distinguished_name"),
            "{e}"
        );
        let e = Cli::try_parse_from(["warren-broker", "--ssl-cert-login-from", "cn"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--ssl-cert-login-from") && e.contains("common_name"),
            "{e}"
        );
        let cli = Cli::try_parse_from([
            "warren-broker",
            "--ssl-cert-login-from",
            "distinguished_name",
        ])
        .unwrap();
        assert_eq!(
            cli.ssl_cert_login_from,
            Some(CertLoginFrom::DistinguishedName)
        );
    }

    /// Both timeouts in seconds: default, file, a flag over the file, and refused values.
    #[test]
    fn timeouts_from_flag_or_file() {
        type Get = fn(&Config) -> std::time::Duration;
        let cases: [(&str, u64, Get); 2] = [
            ("handshake-timeout", 10, |c| c.handshake_timeout),
            ("write-timeout", 30, |c| c.write_timeout),
        ];
        let dir = std::env::temp_dir().join(format!("warren-cfg-timeouts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (key, default, get) in cases {
            let path = dir.join(format!("{key}.toml"));
            std::fs::write(&path, format!("{key} = 3\n")).unwrap();
            let from_file = |cli: Cli| {
                Config::resolve(Cli {
                    config: Some(path.clone()),
                    ..cli
                })
            };
            assert_eq!(
                get(&Config::default()),
                std::time::Duration::from_secs(default)
            );
            let c = from_file(Cli::default()).unwrap();
            assert_eq!(get(&c), std::time::Duration::from_secs(3), "{key}");
            let flag = format!("--{key}=0.5");
            let cli = Cli::try_parse_from(["warren-broker", flag.as_str()]).unwrap();
            let c = from_file(cli).unwrap();
            assert_eq!(get(&c), std::time::Duration::from_millis(500), "{key}");
            for bad in ["0", "-1", "1e9"] {
                let flag = format!("--{key}={bad}");
                let cli = Cli::try_parse_from(["warren-broker", flag.as_str()]).unwrap();
                let e = Config::resolve(cli).unwrap_err().to_string();
                assert!(e.contains(key), "{e}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_tiny_frame_max() {
        let c = Config {
            frame_max: 100,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
