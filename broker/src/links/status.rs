//! What a running link reports: its state, since when, where it is connected, and its counters.
//! The management API (`/api/shovels`, `/api/federation-links`) and the Prometheus families
//! read the same [`LinkStatus`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};

/// What kind of link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkKind {
    Shovel,
    /// A federated exchange's link to one upstream.
    Exchange,
    /// A federated queue's link to one upstream.
    Queue,
}

impl LinkKind {
    /// `type` in `/api/federation-links` and the `type` metric label.
    pub fn federation_type(self) -> &'static str {
        match self {
            LinkKind::Exchange => "exchange",
            LinkKind::Queue => "queue",
            LinkKind::Shovel => "shovel",
        }
    }
}

/// A link's state. Shovels report `terminated` with a reason, federation links `error`, as in
/// RabbitMQ; both mean "not connected, retrying after the reconnect delay" (or, for a shovel
/// with `reconnect-delay` 0, stopped for good).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Starting,
    Running,
    Failed(String),
}

impl State {
    pub fn name(&self, kind: LinkKind) -> &'static str {
        match (self, kind) {
            (State::Starting, _) => "starting",
            (State::Running, _) => "running",
            (State::Failed(_), LinkKind::Shovel) => "terminated",
            (State::Failed(_), _) => "error",
        }
    }
}

/// The states a metric reports one of (1 for the current one, 0 for the others).
pub const SHOVEL_STATES: &[&str] = &["starting", "running", "terminated"];
pub const FEDERATION_STATES: &[&str] = &["starting", "running", "error"];

#[derive(Debug)]
struct Inner {
    state: State,
    since: SystemTime,
    /// Redacted URIs of the current (or last tried) connections.
    src_uri: String,
    dest_uri: String,
    /// The name of the link's connection to the local node, as `/api/connections` shows it.
    local_connection: Option<String>,
}

/// The status of one link. Counters are updated by the link's task without a lock.
#[derive(Debug)]
pub struct LinkStatus {
    pub kind: LinkKind,
    pub vhost: String,
    /// The shovel's name, or the federated exchange's or queue's name.
    pub name: String,
    /// The upstream's name (federation links).
    pub upstream: String,
    /// Fields describing the endpoints, shown while running: `src_queue`, `dest_exchange`, … for
    /// a shovel; `upstream_exchange` / `upstream_queue`, `consumer_tag` for a federation link.
    pub endpoints: Vec<(&'static str, String)>,
    inner: Mutex<Inner>,
    /// Messages published to the destination and settled with the source.
    pub forwarded: AtomicU64,
    /// Messages received from the source and not yet acknowledged to it.
    pub pending: AtomicU64,
}

impl LinkStatus {
    pub fn new(
        kind: LinkKind,
        vhost: &str,
        name: &str,
        upstream: &str,
        endpoints: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            kind,
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            upstream: upstream.to_owned(),
            endpoints,
            inner: Mutex::new(Inner {
                state: State::Starting,
                since: SystemTime::now(),
                src_uri: String::new(),
                dest_uri: String::new(),
                local_connection: None,
            }),
            forwarded: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> State {
        self.inner.lock().state.clone()
    }

    pub fn state_name(&self) -> &'static str {
        self.inner.lock().state.name(self.kind)
    }

    fn set(&self, state: State) {
        let mut i = self.inner.lock();
        if i.state != state {
            i.state = state;
            i.since = SystemTime::now();
        }
    }

    pub fn set_starting(&self) {
        self.pending.store(0, Ordering::Relaxed);
        self.set(State::Starting);
    }

    /// Connected: where to, and the local connection's name.
    pub fn set_running(&self, src_uri: &str, dest_uri: &str, local_connection: Option<String>) {
        {
            let mut i = self.inner.lock();
            i.src_uri = src_uri.to_owned();
            i.dest_uri = dest_uri.to_owned();
            i.local_connection = local_connection;
        }
        self.set(State::Running);
    }

    /// Not connected (each failed attempt refreshes the timestamp, as in RabbitMQ).
    pub fn set_failed(&self, reason: &str) {
        self.pending.store(0, Ordering::Relaxed);
        let mut i = self.inner.lock();
        i.local_connection = None;
        i.state = State::Failed(reason.to_owned());
        i.since = SystemTime::now();
    }

    /// The URI being tried, shown by a federation link even before it connects.
    pub fn set_uri(&self, uri: &str) {
        self.inner.lock().src_uri = uri.to_owned();
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// A stable short id (RabbitMQ shows 8 hex digits per federation link).
    pub fn id(&self) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(
            format!(
                "{}\0{}\0{}\0{}",
                self.kind.federation_type(),
                self.vhost,
                self.name,
                self.upstream
            )
            .as_bytes(),
        );
        d[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The shovel's entry in `/api/shovels` (RabbitMQ 3.10's shape).
    pub fn shovel_json(&self, node: &str) -> Value {
        let i = self.inner.lock();
        let mut m = Map::new();
        m.insert("node".into(), json!(node));
        m.insert("timestamp".into(), json!(erlang_timestamp(i.since)));
        m.insert("name".into(), json!(self.name));
        m.insert("vhost".into(), json!(self.vhost));
        m.insert("type".into(), json!("dynamic"));
        m.insert("state".into(), json!(i.state.name(self.kind)));
        match &i.state {
            State::Running => {
                m.insert("src_uri".into(), json!(i.src_uri));
                m.insert("src_protocol".into(), json!("amqp091"));
                m.insert("dest_protocol".into(), json!("amqp091"));
                m.insert("dest_uri".into(), json!(i.dest_uri));
                for (k, v) in &self.endpoints {
                    m.insert((*k).into(), json!(v));
                }
            }
            State::Failed(reason) => {
                m.insert("reason".into(), json!(reason));
            }
            State::Starting => {}
        }
        m.insert("forwarded".into(), json!(self.forwarded()));
        m.insert("pending".into(), json!(self.pending()));
        Value::Object(m)
    }

    /// The link's entry in `/api/federation-links` (RabbitMQ 3.10's shape).
    pub fn federation_json(&self, node: &str) -> Value {
        let i = self.inner.lock();
        let mut m = Map::new();
        m.insert("node".into(), json!(node));
        let kind = self.kind.federation_type();
        m.insert(kind.into(), json!(self.name));
        for (k, v) in &self.endpoints {
            m.insert((*k).into(), json!(v));
        }
        m.insert("type".into(), json!(kind));
        m.insert("vhost".into(), json!(self.vhost));
        m.insert("upstream".into(), json!(self.upstream));
        m.insert("id".into(), json!(self.id()));
        m.insert("status".into(), json!(i.state.name(self.kind)));
        match &i.state {
            State::Running => {
                if let Some(c) = &i.local_connection {
                    m.insert("local_connection".into(), json!(c));
                }
            }
            State::Failed(reason) => {
                m.insert("error".into(), json!(reason));
            }
            State::Starting => {}
        }
        m.insert("uri".into(), json!(i.src_uri));
        m.insert("timestamp".into(), json!(erlang_timestamp(i.since)));
        m.insert("forwarded".into(), json!(self.forwarded()));
        m.insert("pending".into(), json!(self.pending()));
        Value::Object(m)
    }
}

/// `2026-11-22 1:13:02`: RabbitMQ's status timestamp format (hour not zero-padded), in UTC.
pub fn erlang_timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y}-{m:02}-{d:02} {}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_look_like_rabbitmqs() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_309_982);
        assert_eq!(erlang_timestamp(t), "2026-11-22 1:13:02");
        assert_eq!(
            erlang_timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01 0:00:00"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(erlang_timestamp(leap), "2000-02-29 0:00:00");
    }

    #[test]
    fn shovel_json_by_state() {
        let s = LinkStatus::new(
            LinkKind::Shovel,
            "/",
            "s",
            "",
            vec![("src_queue", "a".into()), ("dest_queue", "b".into())],
        );
        let j = s.shovel_json("n");
        assert_eq!(j["state"], "starting");
        assert!(j.get("src_uri").is_none());
        s.set_running("amqp://", "amqp://h", None);
        let j = s.shovel_json("n");
        assert_eq!(j["state"], "running");
        assert_eq!(j["dest_uri"], "amqp://h");
        assert_eq!(j["src_queue"], "a");
        s.set_failed("connection refused");
        let j = s.shovel_json("n");
        assert_eq!(j["state"], "terminated");
        assert_eq!(j["reason"], "connection refused");
        assert!(j.get("src_queue").is_none());
    }

    #[test]
    fn federation_json_by_state() {
        let s = LinkStatus::new(
            LinkKind::Queue,
            "/",
            "q",
            "up",
            vec![
                ("upstream_queue", "q".into()),
                ("consumer_tag", "federation-link-up".into()),
            ],
        );
        s.set_uri("amqp://h");
        s.set_failed("econnrefused");
        let j = s.federation_json("n");
        assert_eq!(j["status"], "error");
        assert_eq!(j["error"], "econnrefused");
        assert_eq!(j["queue"], "q");
        assert_eq!(j["type"], "queue");
        assert_eq!(j["uri"], "amqp://h");
        assert_eq!(j["id"].as_str().unwrap().len(), 8);
        s.set_running("amqp://h", "", Some("127.0.0.1:1 -> 127.0.0.1:2".into()));
        let j = s.federation_json("n");
        assert_eq!(j["status"], "running");
        assert_eq!(j["local_connection"], "127.0.0.1:1 -> 127.0.0.1:2");
    }
}
