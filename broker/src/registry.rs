//! The node's open connections, for the management API: who is connected, on which channels,
//! and a way to close a connection from outside its task.
//!
//! Kept beside the message path: a connection registers once after its handshake and
//! deregisters when it ends; channels register when opened. Nothing here is touched while
//! publishing or delivering.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::channel::ChannelShared;
use crate::connection::ConnShared;

/// What the handshake established about a connection.
#[derive(Debug)]
pub struct ConnectionInfo {
    /// RabbitMQ's connection name: `peer -> local`.
    pub name: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub client_properties: FieldTable,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub auth_mechanism: String,
    /// The TLS session, on the AMQPS listener.
    pub tls: Option<crate::tls::TlsSession>,
}

/// Requests from outside the connection's task, and its open channels.
#[derive(Debug, Default)]
pub struct ConnectionControl {
    close: Notify,
    close_reason: Mutex<Option<String>>,
    channels: Mutex<Vec<Weak<ChannelShared>>>,
}

impl ConnectionControl {
    /// Asks the connection to close with 320 CONNECTION_FORCED and this reason.
    pub fn request_close(&self, reason: &str) {
        *self.close_reason.lock() = Some(reason.to_owned());
        // notify_one keeps a permit if the reader is not waiting right now.
        self.close.notify_one();
    }

    /// Resolves when a close was requested; returns the reason.
    pub async fn close_requested(&self) -> String {
        self.close.notified().await;
        self.close_reason
            .lock()
            .clone()
            .unwrap_or_else(|| "Closed via management plugin".to_owned())
    }

    pub fn add_channel(&self, ch: &Arc<ChannelShared>) {
        let mut list = self.channels.lock();
        list.retain(|w| w.upgrade().is_some_and(|c| c.is_open()));
        list.push(Arc::downgrade(ch));
    }

    /// The connection's open channels, by number.
    pub fn channels(&self) -> Vec<Arc<ChannelShared>> {
        let mut out: Vec<Arc<ChannelShared>> = self
            .channels
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| c.is_open())
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }
}

/// Which connection limit a new connection would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The vhost's `max-connections`.
    Vhost(u64),
    /// The user's `max-connections`.
    User(u64),
}

/// Open connections by id.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    open: RwLock<BTreeMap<u64, Arc<ConnShared>>>,
}

impl ConnectionRegistry {
    pub fn deregister(&self, id: u64) {
        self.open.write().remove(&id);
    }

    pub fn list(&self) -> Vec<Arc<ConnShared>> {
        self.open.read().values().cloned().collect()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<ConnShared>> {
        self.open
            .read()
            .values()
            .find(|c| c.info.name == name)
            .cloned()
    }

    /// Registers `conn` unless its vhost already has `vhost_max` connections or its user
    /// `user_max`: counted and inserted under one lock, so connections opening together cannot
    /// overshoot a limit.
    pub fn register_within(
        &self,
        conn: Arc<ConnShared>,
        vhost_max: Option<u64>,
        user_max: Option<u64>,
    ) -> Result<(), Over> {
        let mut open = self.open.write();
        let count = |f: &dyn Fn(&ConnShared) -> bool| open.values().filter(|c| f(c)).count();
        if let Some(max) = vhost_max
            && count(&|c| c.vhost.name == conn.vhost.name) as u64 >= max
        {
            return Err(Over::Vhost(max));
        }
        if let Some(max) = user_max
            && count(&|c| c.user == conn.user) as u64 >= max
        {
            return Err(Over::User(max));
        }
        open.insert(conn.id, conn);
        Ok(())
    }

    /// How many channels the user's connections have open.
    pub fn channels_of(&self, user: &str) -> u64 {
        (self.open.read().values())
            .filter(|c| c.user == user)
            .map(|c| c.control.channels().len() as u64)
            .sum()
    }

    pub fn len(&self) -> usize {
        self.open.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.read().is_empty()
    }
}
