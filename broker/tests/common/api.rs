//! A management API client for tests: one broker's `/api`, as guest or another user.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::TestBroker;

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    user: String,
    pass: String,
}

impl Api {
    pub async fn start(b: &TestBroker) -> Self {
        Api {
            base: b.start_management().await,
            http: reqwest::Client::new(),
            user: "guest".into(),
            pass: "guest".into(),
        }
    }

    /// The API at `base` (`http://host:port`), as guest.
    pub fn at(base: String) -> Self {
        Api {
            base,
            http: reqwest::Client::new(),
            user: "guest".into(),
            pass: "guest".into(),
        }
    }

    pub fn as_user(&self, user: &str, pass: &str) -> Self {
        Api {
            base: self.base.clone(),
            http: self.http.clone(),
            user: user.into(),
            pass: pass.into(),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/api{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }
}
