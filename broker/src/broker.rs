//! The node: configuration, users, vhosts and node-wide state shared by every connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::auth::AccessControl;
use crate::config::Config;
use crate::vhost::Vhost;

pub struct Broker {
    pub config: Config,
    pub access: AccessControl,
    vhosts: RwLock<HashMap<String, Arc<Vhost>>>,
    next_connection_id: AtomicU64,
    pub open_connections: AtomicUsize,
    /// Active resource alarms (e.g. "memory", "disk"); publishers are blocked while any is on.
    alarms: watch::Sender<Vec<String>>,
}

impl Broker {
    /// A fresh node: the default vhost, and the default user with full permissions on it.
    pub fn new(config: Config) -> Arc<Self> {
        let access = AccessControl::default();
        access.set_loopback_users(config.loopback_users.clone());
        access.add_user(
            &config.default_user,
            &config.default_pass,
            &["administrator"],
        );
        if let Err(e) = access.set_permissions(
            &config.default_user,
            &config.default_vhost,
            ".*",
            ".*",
            ".*",
        ) {
            tracing::error!("{e}");
        }
        let mut vhosts = HashMap::new();
        vhosts.insert(
            config.default_vhost.clone(),
            Vhost::new(&config.default_vhost),
        );
        let (alarms, _) = watch::channel(Vec::new());
        Arc::new(Self {
            config,
            access,
            vhosts: RwLock::new(vhosts),
            next_connection_id: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
            alarms,
        })
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn add_vhost(&self, name: &str) -> Arc<Vhost> {
        self.vhosts
            .write()
            .entry(name.to_owned())
            .or_insert_with(|| Vhost::new(name))
            .clone()
    }

    pub fn vhost_names(&self) -> Vec<String> {
        self.vhosts.read().keys().cloned().collect()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Raises a resource alarm: connections that publish are blocked until every alarm clears.
    pub fn set_alarm(&self, resource: &str) {
        self.alarms.send_modify(|a| {
            if !a.iter().any(|x| x == resource) {
                a.push(resource.to_owned());
            }
        });
    }

    pub fn clear_alarm(&self, resource: &str) {
        self.alarms.send_modify(|a| a.retain(|x| x != resource));
    }

    pub fn alarms(&self) -> watch::Receiver<Vec<String>> {
        self.alarms.subscribe()
    }
}
