//! Reading JSON request bodies. Every error is a 400 whose reason names the field, so a
//! client sees what to fix. Unknown fields are ignored where RabbitMQ ignores them.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{ApiError, ApiResult};

/// A JSON object body. An empty body is an empty object (RabbitMQ accepts `PUT` without one).
pub struct Body(pub Map<String, Value>);

impl Body {
    pub fn parse(bytes: &Bytes) -> ApiResult<Self> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ApiError::bad_request(
                "the request body must be a JSON object",
            )),
            Err(_) => Err(ApiError::bad_request("not_json")),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn opt_bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            // RabbitMQ's UI and rabbitmqadmin send booleans as strings.
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(v) => Err(wrong(key, "a boolean", v)),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> ApiResult<bool> {
        Ok(self.opt_bool(key)?.unwrap_or(default))
    }

    pub fn opt_str(&self, key: &str) -> ApiResult<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(key, "a string", v)),
        }
    }

    pub fn req_str(&self, key: &str) -> ApiResult<&str> {
        self.opt_str(key)?.ok_or_else(|| missing(key))
    }

    /// A non-negative integer; rabbitmqadmin sends numbers as strings, so those are accepted.
    pub fn opt_u64(&self, key: &str) -> ApiResult<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .map(Some)
                .ok_or_else(|| wrong(key, "a non-negative integer", v)),
        }
    }

    pub fn opt_object(&self, key: &str) -> ApiResult<Option<&Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(wrong(key, "a JSON object", v)),
        }
    }

    /// User tags: a comma-separated string or a list of strings.
    pub fn tags(&self, key: &str) -> ApiResult<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )),
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(|s| s.trim().to_owned())
                        .ok_or_else(|| wrong(key, "a list of strings", t))
                })
                .filter(|t| !matches!(t, Ok(s) if s.is_empty()))
                .collect::<ApiResult<Vec<_>>>()
                .map(Some),
            Some(v) => Err(wrong(
                key,
                "a comma-separated string or a list of strings",
                v,
            )),
        }
    }
}

pub fn wrong(key: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::bad_request(format!("field '{key}' must be {expected}, got {got}"))
}

pub fn missing(key: &str) -> ApiError {
    ApiError::bad_request(format!("field '{key}' is required"))
}

/// A boolean query parameter (`?if-unused=true`).
pub fn query_flag(query: &std::collections::HashMap<String, String>, key: &str) -> bool {
    query.get(key).is_some_and(|v| v == "true")
}
