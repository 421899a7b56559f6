//! Users, password hashes, tags and permissions, and the checks every method goes through.
//!
//! Password hashes use RabbitMQ's `rabbit_password_hashing_sha256` format
//! (base64 of a 4-byte salt followed by SHA-256(salt ‖ password)), so definitions exported from
//! RabbitMQ can be imported unchanged later. Permission regexes are matched unanchored, as
//! RabbitMQ does: `^$` grants nothing, `.*` everything.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use parking_lot::RwLock;
use regex::Regex;
use sha2::{Digest, Sha256};

use crate::error::{AmqpError, Result};

#[derive(Debug)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    pub tags: Vec<String>,
}

impl User {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// Per-vhost configure/write/read permissions of one user.
#[derive(Debug)]
pub struct Permission {
    pub configure: Regex,
    pub write: Regex,
    pub read: Regex,
}

/// Topic permissions of one user for one topic exchange in a vhost.
#[derive(Debug)]
pub struct TopicPermission {
    pub exchange: String,
    pub write: Regex,
    pub read: Regex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Configure => "configure",
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// What kind of resource a permission check is about, for the error text.
#[derive(Debug, Clone, Copy)]
pub enum Resource {
    Exchange,
    Queue,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Exchange => "exchange",
            Resource::Queue => "queue",
        }
    }
}

pub fn hash_password(password: &str) -> String {
    let salt: [u8; 4] = rand::random();
    hash_with_salt(&salt, password)
}

fn hash_with_salt(salt: &[u8], password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    B64.encode(out)
}

/// Is `hash` in the stored format (base64 of 4-byte salt + SHA-256)?
pub fn is_password_hash(hash: &str) -> bool {
    B64.decode(hash).is_ok_and(|raw| raw.len() == 36)
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(raw) = B64.decode(hash) else {
        return false;
    };
    if raw.len() != 36 {
        return false;
    }
    let expected = hash_with_salt(&raw[..4], password);
    // Constant-time comparison of the encoded forms.
    expected.len() == hash.len()
        && expected
            .bytes()
            .zip(hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(crate) fn compile(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("invalid permission regex {pattern:?}: {e}"))
}

/// (user, vhost)
type UserVhost = (String, String);

/// The node's own account, used by its federation links and shovels to reach the node through
/// an `amqp://` URI without a host (RabbitMQ's direct connection as user `none`). It is not a
/// stored user: it logs in only from loopback with a secret the node draws at start-up
/// ([`AccessControl::set_internal_secret`]), has every permission on every vhost, may publish
/// any `user-id`, and never appears in the user list, definitions or the snapshot. The name is
/// reserved: the management API refuses to create a user by this name.
pub const INTERNAL_USER: &str = "warren-links";

/// The node's users and their permissions.
#[derive(Debug, Default)]
pub struct AccessControl {
    users: RwLock<HashMap<String, Arc<User>>>,
    permissions: RwLock<HashMap<(String, String), Arc<Permission>>>,
    topic_permissions: RwLock<HashMap<UserVhost, Vec<Arc<TopicPermission>>>>,
    loopback_users: RwLock<Vec<String>>,
    /// The internal account's password (see [`INTERNAL_USER`]); `None` disables it.
    internal_secret: RwLock<Option<String>>,
    /// Addresses besides loopback the internal account may log in from: the node's own
    /// listener addresses (a listener bound to one address is reached from that address).
    internal_peers: RwLock<Vec<IpAddr>>,
    /// Users' limits (see [`crate::limits`]); deleting a user deletes them.
    user_limits: RwLock<HashMap<String, crate::limits::Limits>>,
}

/// Full configure/write/read access (the internal account's, on every vhost).
fn full_access() -> Arc<Permission> {
    static FULL: std::sync::OnceLock<Arc<Permission>> = std::sync::OnceLock::new();
    FULL.get_or_init(|| {
        let all = || Regex::new(".*").expect("valid regex");
        Arc::new(Permission {
            configure: all(),
            write: all(),
            read: all(),
        })
    })
    .clone()
}

impl AccessControl {
    /// Enables the internal account with this password (see [`INTERNAL_USER`]).
    pub fn set_internal_secret(&self, secret: String) {
        *self.internal_secret.write() = Some(secret);
    }

    /// The internal account's password, for the links that log in with it.
    pub fn internal_secret(&self) -> Option<String> {
        self.internal_secret.read().clone()
    }

    /// Lets the internal account log in from `ip`, one of the node's own addresses.
    pub fn allow_internal_from(&self, ip: IpAddr) {
        let mut peers = self.internal_peers.write();
        if !peers.contains(&ip) {
            peers.push(ip);
        }
    }

    fn is_internal(&self, user: &str) -> bool {
        user == INTERNAL_USER && self.internal_secret.read().is_some()
    }

    /// Whether `user` may publish messages whose `user-id` names someone else (RabbitMQ's
    /// `impersonator` tag; the internal account republishes federated messages as is).
    pub fn may_impersonate(&self, user: &str) -> bool {
        self.is_internal(user) || self.user(user).is_some_and(|u| u.has_tag("impersonator"))
    }

    pub fn set_loopback_users(&self, users: Vec<String>) {
        *self.loopback_users.write() = users;
    }

    pub fn add_user(&self, name: &str, password: &str, tags: &[&str]) {
        self.put_user(User {
            name: name.to_owned(),
            password_hash: hash_password(password),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        });
    }

    pub fn put_user(&self, user: User) {
        self.users.write().insert(user.name.clone(), Arc::new(user));
    }

    pub fn delete_user(&self, name: &str) -> bool {
        self.user_limits.write().remove(name);
        self.permissions.write().retain(|(u, _), _| u != name);
        self.topic_permissions.write().retain(|(u, _), _| u != name);
        self.users.write().remove(name).is_some()
    }

    /// A user's limits (`max-connections`, `max-channels`; see [`crate::limits`]).
    pub fn user_limits(&self, name: &str) -> crate::limits::Limits {
        self.user_limits
            .read()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Every user's limits (users without any left out).
    pub fn all_user_limits(&self) -> Vec<(String, crate::limits::Limits)> {
        let mut all: Vec<_> = self
            .user_limits
            .read()
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(u, l)| (u.clone(), l.clone()))
            .collect();
        all.sort();
        all
    }

    /// Replaces a user's limits (none: empty).
    pub fn set_user_limits(&self, name: &str, limits: crate::limits::Limits) {
        let mut all = self.user_limits.write();
        if limits.is_empty() {
            all.remove(name);
        } else {
            all.insert(name.to_owned(), limits);
        }
    }

    pub fn user(&self, name: &str) -> Option<Arc<User>> {
        self.users.read().get(name).cloned()
    }

    pub fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> std::result::Result<(), String> {
        let p = Permission {
            configure: compile(configure)?,
            write: compile(write)?,
            read: compile(read)?,
        };
        self.permissions
            .write()
            .insert((user.to_owned(), vhost.to_owned()), Arc::new(p));
        Ok(())
    }

    pub fn clear_permissions(&self, user: &str, vhost: &str) {
        self.permissions
            .write()
            .remove(&(user.to_owned(), vhost.to_owned()));
    }

    pub fn set_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> std::result::Result<(), String> {
        let tp = Arc::new(TopicPermission {
            exchange: exchange.to_owned(),
            write: compile(write)?,
            read: compile(read)?,
        });
        let mut all = self.topic_permissions.write();
        let list = all.entry((user.to_owned(), vhost.to_owned())).or_default();
        list.retain(|t| t.exchange != exchange);
        list.push(tp);
        Ok(())
    }

    /// Every user, sorted by name.
    pub fn users(&self) -> Vec<Arc<User>> {
        let mut v: Vec<Arc<User>> = self.users.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every (user, vhost, permission), sorted by user then vhost.
    pub fn permissions(&self) -> Vec<(String, String, Arc<Permission>)> {
        let mut v: Vec<_> = self
            .permissions
            .read()
            .iter()
            .map(|((u, vh), p)| (u.clone(), vh.clone(), p.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// Every (user, vhost, topic permission), sorted by user, vhost, exchange.
    pub fn topic_permissions(&self) -> Vec<(String, String, Arc<TopicPermission>)> {
        let mut v: Vec<_> = self
            .topic_permissions
            .read()
            .iter()
            .flat_map(|((u, vh), list)| {
                list.iter()
                    .map(|tp| (u.clone(), vh.clone(), tp.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1, &a.2.exchange).cmp(&(&b.0, &b.1, &b.2.exchange)));
        v
    }

    /// Removes a user's topic permissions in a vhost (for one exchange, or all); false if
    /// there were none.
    pub fn clear_topic_permissions(&self, user: &str, vhost: &str, exchange: Option<&str>) -> bool {
        let mut all = self.topic_permissions.write();
        let key = (user.to_owned(), vhost.to_owned());
        let Some(list) = all.get_mut(&key) else {
            return false;
        };
        let before = list.len();
        match exchange {
            Some(x) => list.retain(|t| t.exchange != x),
            None => list.clear(),
        }
        let removed = list.len() != before;
        if list.is_empty() {
            all.remove(&key);
        }
        removed
    }

    /// Forgets every permission on a deleted vhost.
    pub fn clear_vhost(&self, vhost: &str) {
        self.permissions.write().retain(|(_, v), _| v != vhost);
        self.topic_permissions
            .write()
            .retain(|(_, v), _| v != vhost);
    }

    /// Authentication (SASL, and the management API's HTTP basic auth): the user, if the
    /// password matches and the peer may use it.
    pub fn authenticate(&self, name: &str, password: &str, peer: IpAddr) -> Result<Arc<User>> {
        let refused = || {
            AmqpError::access_refused(format!(
                "Login was refused using authentication mechanism PLAIN. For details see the broker logfile. (user '{name}')"
            ))
        };
        if name == INTERNAL_USER {
            let secret = self.internal_secret.read().clone();
            return match secret {
                Some(s)
                    if (peer.is_loopback() || self.internal_peers.read().contains(&peer))
                        && s.len() == password.len()
                        && s.bytes()
                            .zip(password.bytes())
                            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                            == 0 =>
                {
                    Ok(Arc::new(User {
                        name: INTERNAL_USER.to_owned(),
                        password_hash: String::new(),
                        tags: vec!["administrator".into(), "impersonator".into()],
                    }))
                }
                _ => Err(refused()),
            };
        }
        let user = self.user(name).ok_or_else(refused)?;
        if !verify_password(&user.password_hash, password) {
            return Err(refused());
        }
        if !peer.is_loopback() && self.loopback_users.read().iter().any(|u| u == name) {
            return Err(AmqpError::access_refused(format!(
                "user '{name}' can only connect via localhost"
            )));
        }
        Ok(user)
    }

    /// SASL EXTERNAL: the user named by a verified client certificate, without a password.
    /// The user must exist (the node's internal account never logs in this way) and, like any
    /// login, a loopback-only user must come from a loopback address.
    pub fn authenticate_external(&self, name: &str, peer: IpAddr) -> Result<Arc<User>> {
        let refused = || {
            AmqpError::access_refused(format!(
                "Login was refused using authentication mechanism EXTERNAL: no user '{name}' \
                 (the name taken from the client certificate)"
            ))
        };
        if name == INTERNAL_USER {
            return Err(refused());
        }
        let user = self.user(name).ok_or_else(refused)?;
        if !peer.is_loopback() && self.loopback_users.read().iter().any(|u| u == name) {
            return Err(AmqpError::access_refused(format!(
                "user '{name}' can only connect via localhost"
            )));
        }
        Ok(user)
    }

    pub fn vhost_permission(&self, user: &str, vhost: &str) -> Option<Arc<Permission>> {
        if self.is_internal(user) {
            return Some(full_access());
        }
        self.permissions
            .read()
            .get(&(user.to_owned(), vhost.to_owned()))
            .cloned()
    }

    /// Checks `access` on a named exchange or queue; 403 with RabbitMQ's wording otherwise.
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Result<()> {
        let name = if matches!(resource, Resource::Exchange) && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        let allowed = self.vhost_permission(user, vhost).is_some_and(|p| {
            match access {
                Access::Configure => &p.configure,
                Access::Write => &p.write,
                Access::Read => &p.read,
            }
            .is_match(name)
        });
        if allowed {
            Ok(())
        } else {
            Err(AmqpError::access_refused(format!(
                "{} access to {} '{}' in vhost '{}' refused for user '{}'",
                access.name(),
                resource.name(),
                name,
                vhost,
                user
            )))
        }
    }

    /// Topic permission check for a routing key on a topic exchange. Without topic
    /// permissions for that exchange, everything is allowed (as in RabbitMQ).
    pub fn check_topic(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        access: Access,
    ) -> Result<()> {
        let all = self.topic_permissions.read();
        let Some(list) = all.get(&(user.to_owned(), vhost.to_owned())) else {
            return Ok(());
        };
        let Some(tp) = list.iter().find(|t| t.exchange == exchange) else {
            return Ok(());
        };
        let re = if access == Access::Read {
            &tp.read
        } else {
            &tp.write
        };
        if re.is_match(routing_key) {
            Ok(())
        } else {
            Err(AmqpError::access_refused(format!(
                "{} access to topic '{}' in exchange '{}' in vhost '{}' refused for user '{}'",
                access.name(),
                routing_key,
                exchange,
                vhost,
                user
            )))
        }
    }
}

/// Parses a SASL PLAIN response: `authzid \0 authcid \0 password`.
pub fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(pass.to_vec()).ok()?,
    ))
}

/// Parses an AMQPLAIN response: a field table without its length prefix, with LOGIN and PASSWORD.
pub fn parse_amqplain(response: &[u8]) -> Option<(String, String)> {
    use amq_protocol::types::AMQPValue;
    let mut framed = (response.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    // Before login: a deeply nested table would overflow amq-protocol's recursive parser.
    crate::codec::check_table(&framed, "the AMQPLAIN response").ok()?;
    let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
    let get = |k: &str| match table.inner().get(k)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((get("LOGIN")?, get("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqplain_response_nested_too_deep_is_refused_not_parsed() {
        // 200,000 nested arrays under LOGIN: amq-protocol alone would overflow the stack.
        let depth = 200_000;
        let mut r = vec![5];
        r.extend_from_slice(b"LOGIN");
        for level in 0..depth {
            r.push(b'A');
            r.extend_from_slice(&((5 * (depth - 1 - level)) as u32).to_be_bytes());
        }
        assert_eq!(parse_amqplain(&r), None);
        let mut ok = vec![5];
        ok.extend_from_slice(b"LOGIN");
        ok.extend_from_slice(b"S\0\0\0\x01u");
        ok.extend_from_slice(&[8]);
        ok.extend_from_slice(b"PASSWORD");
        ok.extend_from_slice(b"S\0\0\0\x01p");
        assert_eq!(parse_amqplain(&ok), Some(("u".into(), "p".into())));
    }

    #[test]
    fn rabbitmq_sha256_hash_verifies() {
        let h = hash_password("s3cret");
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cret!"));
        assert!(!verify_password("not base64", "x"));
    }

    #[test]
    fn guest_only_from_loopback() {
        let ac = AccessControl::default();
        ac.add_user("guest", "guest", &["administrator"]);
        ac.set_loopback_users(vec!["guest".into()]);
        assert!(
            ac.authenticate("guest", "guest", "127.0.0.1".parse().unwrap())
                .is_ok()
        );
        let e = ac
            .authenticate("guest", "guest", "10.0.0.1".parse().unwrap())
            .unwrap_err();
        assert_eq!(e.code, 403);
        assert!(
            ac.authenticate("guest", "nope", "127.0.0.1".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn external_login_needs_an_existing_user_and_no_password() {
        let ac = AccessControl::default();
        ac.put_user(User {
            name: "alice".into(),
            password_hash: String::new(),
            tags: vec![],
        });
        ac.add_user("guest", "guest", &["administrator"]);
        ac.set_loopback_users(vec!["guest".into()]);
        let remote: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            ac.authenticate_external("alice", remote).unwrap().name,
            "alice"
        );
        // A user without a password cannot log in with one.
        assert!(ac.authenticate("alice", "", remote).is_err());
        let e = ac.authenticate_external("mallory", remote).unwrap_err();
        assert_eq!(e.code, 403);
        assert!(
            e.text.contains("EXTERNAL") && e.text.contains("'mallory'"),
            "{}",
            e.text
        );
        assert!(ac.authenticate_external("guest", remote).is_err());
        assert!(
            ac.authenticate_external("guest", "127.0.0.1".parse().unwrap())
                .is_ok()
        );
        ac.set_internal_secret("s".into());
        assert!(
            ac.authenticate_external(INTERNAL_USER, "127.0.0.1".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn internal_account_only_with_the_secret_from_loopback() {
        let ac = AccessControl::default();
        let lo = "127.0.0.1".parse().unwrap();
        assert!(
            ac.authenticate(INTERNAL_USER, "", lo).is_err(),
            "off by default"
        );
        assert!(ac.vhost_permission(INTERNAL_USER, "/").is_none());
        ac.set_internal_secret("s3cret".into());
        let u = ac.authenticate(INTERNAL_USER, "s3cret", lo).unwrap();
        assert!(u.has_tag("administrator"));
        assert!(ac.authenticate(INTERNAL_USER, "s3cre", lo).is_err());
        assert!(
            ac.authenticate(INTERNAL_USER, "s3cret", "10.0.0.1".parse().unwrap())
                .is_err()
        );
        ac.allow_internal_from("10.0.0.1".parse().unwrap());
        assert!(
            ac.authenticate(INTERNAL_USER, "s3cret", "10.0.0.1".parse().unwrap())
                .is_ok(),
            "from the node's own listener address"
        );
        assert!(ac.vhost_permission(INTERNAL_USER, "any").is_some());
        assert!(ac.may_impersonate(INTERNAL_USER));
        assert!(ac.users().is_empty(), "never listed");
        ac.add_user("imp", "pw", &["impersonator"]);
        ac.add_user("plain", "pw", &[]);
        assert!(ac.may_impersonate("imp") && !ac.may_impersonate("plain"));
    }

    #[test]
    fn permissions_are_unanchored_regexes() {
        let ac = AccessControl::default();
        ac.set_permissions("u", "/", "^$", "^app-", ".*").unwrap();
        assert!(
            ac.check("u", "/", Resource::Queue, "q", Access::Configure)
                .is_err()
        );
        assert!(
            ac.check("u", "/", Resource::Exchange, "app-x", Access::Write)
                .is_ok()
        );
        let e = ac
            .check("u", "/", Resource::Exchange, "", Access::Write)
            .unwrap_err();
        assert!(e.text.contains("amq.default"), "{}", e.text);
        assert!(
            ac.check("u", "/other", Resource::Queue, "q", Access::Read)
                .is_err()
        );
    }

    #[test]
    fn topic_permissions_only_where_defined() {
        let ac = AccessControl::default();
        ac.set_topic_permissions("u", "/", "amq.topic", "^a\\.", ".*")
            .unwrap();
        assert!(
            ac.check_topic("u", "/", "amq.topic", "a.b", Access::Write)
                .is_ok()
        );
        assert!(
            ac.check_topic("u", "/", "amq.topic", "b.a", Access::Write)
                .is_err()
        );
        assert!(
            ac.check_topic("u", "/", "other", "b.a", Access::Write)
                .is_ok()
        );
    }

    #[test]
    fn sasl_responses() {
        assert_eq!(
            parse_plain(b"\0guest\0pw"),
            Some(("guest".into(), "pw".into()))
        );
        assert_eq!(parse_plain(b"guest"), None);
        // AMQPLAIN: LOGIN (S) "guest", PASSWORD (S) "pw", as a table body.
        let mut t = Vec::new();
        t.push(5);
        t.extend_from_slice(b"LOGIN");
        t.push(b'S');
        t.extend_from_slice(&5u32.to_be_bytes());
        t.extend_from_slice(b"guest");
        t.push(8);
        t.extend_from_slice(b"PASSWORD");
        t.push(b'S');
        t.extend_from_slice(&2u32.to_be_bytes());
        t.extend_from_slice(b"pw");
        assert_eq!(parse_amqplain(&t), Some(("guest".into(), "pw".into())));
    }
}
