//! HTTP basic authentication and RabbitMQ's management tags.
//!
//! * `administrator`: everything, in every vhost.
//! * `monitoring`: reads everything node-wide (nodes, all connections and channels).
//! * `policymaker`: manages policies and parameters in vhosts it has permissions on.
//! * `management`: reads and declares within vhosts it has permissions on.
//!
//! A user with none of these tags may not use the API at all. As in RabbitMQ, every refusal
//! is a 401: `not_authorized` for bad credentials, `not_authorised` with a reason otherwise.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::ApiError;
use crate::auth::{Access, Resource, User};
use crate::broker::Broker;
use crate::vhost::Vhost;

const MANAGEMENT_TAGS: &[&str] = &["administrator", "monitoring", "policymaker", "management"];

/// The authenticated user making a request.
pub struct Caller {
    pub user: Arc<User>,
}

impl FromRequestParts<Arc<Broker>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        broker: &Arc<Broker>,
    ) -> Result<Self, Self::Rejection> {
        let (name, password) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic)
            .ok_or_else(|| ApiError::login_failed("Login failed"))?;
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .ok_or_else(|| ApiError::login_failed("Login failed"))?;
        let user = match broker.access.authenticate(&name, &password, peer) {
            Ok(u) => u,
            Err(e) if e.text.contains("only connect via localhost") => {
                return Err(ApiError::not_authorised(
                    "User can only log in via localhost",
                ));
            }
            Err(_) => return Err(ApiError::login_failed("Login failed")),
        };
        if !MANAGEMENT_TAGS.iter().any(|t| user.has_tag(t)) {
            return Err(ApiError::not_authorised("Not management user"));
        }
        Ok(Caller { user })
    }
}

/// `Basic base64(user:password)`.
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(B64.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.user.name
    }

    pub fn is_admin(&self) -> bool {
        self.user.has_tag("administrator")
    }

    /// Monitoring users (and administrators) see node-wide state.
    pub fn is_monitor(&self) -> bool {
        self.is_admin() || self.user.has_tag("monitoring")
    }

    pub fn is_policymaker(&self) -> bool {
        self.is_admin() || self.user.has_tag("policymaker")
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not administrator user"))
        }
    }

    pub fn require_monitor(&self) -> Result<(), ApiError> {
        if self.is_monitor() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not monitor user"))
        }
    }

    /// May this user see and act within `vhost`? Administrators everywhere, others where
    /// they have permissions.
    pub fn can_access(&self, broker: &Broker, vhost: &str) -> bool {
        self.is_admin()
            || broker
                .access
                .vhost_permission(&self.user.name, vhost)
                .is_some()
    }

    /// The vhost, if it exists (404) and the user may access it (401).
    pub fn vhost(&self, broker: &Broker, name: &str) -> Result<Arc<Vhost>, ApiError> {
        let v = broker.vhost(name).ok_or_else(ApiError::not_found)?;
        if !self.can_access(broker, name) {
            return Err(ApiError::not_authorised(
                "User not authorised to access virtual host",
            ));
        }
        Ok(v)
    }

    /// Policies and parameters: policymakers (and administrators) in vhosts they can access.
    pub fn policy_vhost(&self, broker: &Broker, name: &str) -> Result<Arc<Vhost>, ApiError> {
        let v = broker.vhost(name).ok_or_else(ApiError::not_found)?;
        if !self.is_policymaker() || !self.can_access(broker, name) {
            return Err(ApiError::not_authorised(
                "User not authorised to access object",
            ));
        }
        Ok(v)
    }

    /// The vhosts whose objects this user sees in node-wide lists.
    pub fn visible_vhosts(&self, broker: &Broker) -> Vec<Arc<Vhost>> {
        let mut names = broker.vhost_names();
        names.sort();
        names
            .iter()
            .filter(|n| self.can_access(broker, n))
            .filter_map(|n| broker.vhost(n))
            .collect()
    }

    /// The AMQP permission check a client would go through for the same operation.
    /// Refusals are 401 "not_authorised" with the AMQP text.
    pub fn check(
        &self,
        broker: &Broker,
        vhost: &str,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Result<(), ApiError> {
        // RabbitMQ lets an administrator act in a vhost it has no permissions on at all.
        if self.is_admin()
            && broker
                .access
                .vhost_permission(&self.user.name, vhost)
                .is_none()
        {
            return Ok(());
        }
        Ok(broker
            .access
            .check(&self.user.name, vhost, resource, name, access)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header() {
        assert_eq!(
            parse_basic("Basic Z3Vlc3Q6Z3Vlc3Q="),
            Some(("guest".into(), "guest".into()))
        );
        assert_eq!(
            parse_basic("basic dTpwOmFzcw=="),
            Some(("u".into(), "p:ass".into()))
        );
        assert_eq!(parse_basic("Bearer x"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
    }
}
