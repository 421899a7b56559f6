//! A typed client for the RabbitMQ-compatible management HTTP API, spoken by Warren and by
//! a stock RabbitMQ: timeouts on every request, and errors that carry the broker's own text.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use serde::Deserialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("management API at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("management API refused {method} {path} with {status}: {reason}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        reason: String,
    },
    #[error("management API sent an unexpected answer to {path}: {message}")]
    BadAnswer { path: String, message: String },
}

impl ManagementError {
    /// HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ManagementError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// HTTP clients by the CA they trust besides the usual roots (`None`: only those). A
/// client holds a TLS configuration (the parsed root store) and a pool of connections: one
/// per CA is shared by every reconcile, instead of one built per reconcile (thousands of
/// topology objects resyncing built thousands).
static HTTP_CLIENTS: Mutex<Option<HashMap<Option<[u8; 32]>, reqwest::Client>>> = Mutex::new(None);

/// CAs kept at most; past that the cache starts again (clusters come and go, CAs rotate).
const MAX_HTTP_CLIENTS: usize = 64;

fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    let key = ca_pem.map(|pem| <[u8; 32]>::from(Sha256::digest(pem)));
    if let Some(c) = HTTP_CLIENTS.lock().as_ref().and_then(|m| m.get(&key)) {
        return Ok(c.clone());
    }
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("the cluster's ca.crt is not PEM: {e}"))?;
        if certs.is_empty() {
            return Err("the cluster's ca.crt holds no certificate".into());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let mut cache = HTTP_CLIENTS.lock();
    let map = cache.get_or_insert_with(HashMap::new);
    if map.len() >= MAX_HTTP_CLIENTS {
        map.clear();
    }
    Ok(map.entry(key).or_insert(client).clone())
}

/// One broker's management API.
#[derive(Clone)]
pub struct ManagementClient {
    http: reqwest::Client,
    base: String,
    username: String,
    password: String,
}

/// A queue left on a drained node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct QueueSummary {
    pub vhost: String,
    pub name: String,
    #[serde(default)]
    pub messages: u64,
    #[serde(default)]
    pub consumers: u64,
    #[serde(default)]
    pub durable: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DrainAnswer {
    Wrapped { queues: Vec<QueueSummary> },
    List(Vec<QueueSummary>),
}

impl ManagementClient {
    pub fn new(base: &str, username: &str, password: &str) -> Result<Self, ManagementError> {
        Self::with_ca(base, username, password, None)
    }

    /// A client that, for an `https://` base, also trusts the CA certificates in `ca_pem` (the
    /// cluster's `ca.crt`) besides the usual roots. The server's name is verified as usual.
    pub fn with_ca(
        base: &str,
        username: &str,
        password: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ManagementError> {
        let http = http_client(ca_pem).map_err(|message| ManagementError::Unreachable {
            url: base.to_string(),
            message,
        })?;
        Ok(ManagementClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password: password.to_string(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, ManagementError> {
        let url = format!("{}{}", self.base, path);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = self
            .http
            .request(m, &url)
            .basic_auth(&self.username, Some(&self.password));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| ManagementError::Unreachable {
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
            .unwrap_or(text);
        Err(ManagementError::Refused {
            method,
            path: path.to_string(),
            status: status.as_u16(),
            reason,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ManagementError> {
        let resp = self.send("GET", path, None).await?;
        resp.json().await.map_err(|e| ManagementError::BadAnswer {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<(), ManagementError> {
        self.send("PUT", path, Some(body)).await.map(|_| ())
    }

    /// POST: creates an object the broker names itself (a binding).
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<(), ManagementError> {
        self.send("POST", path, Some(body)).await.map(|_| ())
    }

    /// GET that tells "not there" (404) apart from a failure.
    pub async fn get_opt<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, ManagementError> {
        match self.get(path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// DELETE; a 404 counts as deleted.
    pub async fn delete(&self, path: &str) -> Result<(), ManagementError> {
        match self.send("DELETE", path, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes a stopped node from the broker cluster (`DELETE /api/nodes/{node}`, RabbitMQ's
    /// `forget_cluster_node`). A node that is not a member (404: already forgotten, or a
    /// broker that is not clustered) counts as forgotten.
    pub async fn forget(&self, node: &str) -> Result<(), ManagementError> {
        self.delete(&format!("/api/nodes/{}", segment(node))).await
    }

    /// Whether stopping the node this client talks to would cost a replicated group its
    /// majority (`/api/health/checks/node-is-quorum-critical`): `Some(reason)` if so.
    pub async fn quorum_critical(&self) -> Result<Option<String>, ManagementError> {
        match self
            .send("GET", "/api/health/checks/node-is-quorum-critical", None)
            .await
        {
            Ok(_) => Ok(None),
            Err(ManagementError::Refused {
                status: 503,
                reason,
                ..
            }) => Ok(Some(reason)),
            Err(e) => Err(e),
        }
    }

    /// Puts the node into drain (maintenance) mode and returns the queues left on it. A
    /// Warren node also hands the leadership of its replicated queues and of the cluster's
    /// metadata to other nodes before it answers.
    pub async fn drain(&self) -> Result<Vec<QueueSummary>, ManagementError> {
        let path = "/api/warren/drain";
        let resp = self.send("POST", path, None).await?;
        let answer: DrainAnswer = resp.json().await.map_err(|e| ManagementError::BadAnswer {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        Ok(match answer {
            DrainAnswer::Wrapped { queues } | DrainAnswer::List(queues) => queues,
        })
    }
}

/// A client for the cluster's management API at `url`. For an `https://` URL (a TLS-only
/// cluster, or an annotation saying so) it trusts the `ca.crt` of the cluster's TLS CA Secret
/// ([`crate::cluster::build::management_ca_secret`]) when there is one, besides the usual roots; the server's
/// certificate must name the host (the client Service, or `*.<name>-nodes.<ns>.svc` for a
/// node).
pub async fn management_client(
    client: &kube::Client,
    rc: &crate::crd::RabbitCluster,
    url: &str,
    username: &str,
    password: &str,
) -> Result<ManagementClient, String> {
    use crate::cluster::build;
    use k8s_openapi::api::core::v1::Secret;
    let mut ca = None;
    if url.starts_with("https://")
        && let Some(name) = build::management_ca_secret(rc)
    {
        let secrets: kube::Api<Secret> =
            kube::Api::namespaced(client.clone(), &build::namespace(rc));
        let secret = secrets
            .get_opt(name)
            .await
            .map_err(|e| format!("cannot read the CA of {url} from Secret {name}: {e}"))?;
        ca = secret.and_then(|s| {
            let data = s.data?;
            String::from_utf8(data.get("ca.crt")?.0.clone()).ok()
        });
    }
    ManagementClient::with_ca(url, username, password, ca.as_deref().map(str::as_bytes))
        .map_err(|e| e.to_string())
}

/// Percent-encodes one path segment of a management API URL (`/` becomes `%2F`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_cluster_ca_is_a_clear_error() {
        crate::install_crypto_provider();
        assert!(ManagementClient::with_ca("https://h:15671", "u", "p", None).is_ok());
        let e = ManagementClient::with_ca("https://h:15671", "u", "p", Some(b"not pem"))
            .err()
            .expect("no certificate");
        assert!(e.to_string().contains("ca.crt"), "{e}");
    }
}
