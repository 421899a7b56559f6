//! A typed client for the RabbitMQ-compatible management HTTP API, spoken by Warren and by
//! a stock RabbitMQ: timeouts on every request, and errors that carry the broker's own text.

use std::time::Duration;

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
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ManagementError::Unreachable {
                url: base.to_string(),
                message: e.to_string(),
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

    /// DELETE; a 404 counts as deleted.
    pub async fn delete(&self, path: &str) -> Result<(), ManagementError> {
        match self.send("DELETE", path, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Puts the node into drain (maintenance) mode and returns the queues left on it.
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
