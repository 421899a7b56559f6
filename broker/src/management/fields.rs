//! AMQP field tables and message properties to and from JSON, as RabbitMQ's management plugin
//! converts them: JSON strings become long strings, integers `long`, other numbers `double`;
//! byte arrays and non-UTF-8 strings are shown as (lossy) UTF-8 text.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value, json};

use super::body::wrong;
use super::{ApiError, ApiResult};

pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::Float(f) => Number::from_f64(*f as f64).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let v = d.value as f64 / 10f64.powi(d.scale as i32);
            Number::from_f64(v).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect(),
    )
}

fn json_to_value(v: &Value, field: &str) -> ApiResult<AMQPValue> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                AMQPValue::LongLongInt(i)
            } else if n.is_u64() {
                return Err(ApiError::bad_request(format!(
                    "field '{field}': integer {n} does not fit a signed 64-bit AMQP long"
                )));
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or_default())
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter()
                .map(|x| json_to_value(x, field))
                .collect::<ApiResult<Vec<_>>>()?,
        )),
        Value::Object(m) => AMQPValue::FieldTable(map_to_table(m, field)?),
    })
}

/// A JSON object as an AMQP field table; `field` names it in errors.
pub fn map_to_table(m: &Map<String, Value>, field: &str) -> ApiResult<FieldTable> {
    let mut t = FieldTable::default();
    for (k, v) in m {
        if k.len() > 255 {
            return Err(ApiError::bad_request(format!(
                "field '{field}': key '{k}' is longer than 255 bytes"
            )));
        }
        t.insert(ShortString::from(k.as_str()), json_to_value(v, field)?);
    }
    Ok(t)
}

/// The `arguments` field of a body, as a field table (empty if absent).
pub fn arguments(body: &super::body::Body) -> ApiResult<FieldTable> {
    match body.opt_object("arguments")? {
        Some(m) => map_to_table(m, "arguments"),
        None => Ok(FieldTable::default()),
    }
}

/// Message properties as RabbitMQ's API shows them (only those that are set).
pub fn properties_to_json(p: &AMQPProperties) -> Value {
    let mut m = Map::new();
    let mut s = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), json!(v.as_str()));
        }
    };
    s("content_type", p.content_type());
    s("content_encoding", p.content_encoding());
    s("correlation_id", p.correlation_id());
    s("reply_to", p.reply_to());
    s("expiration", p.expiration());
    s("message_id", p.message_id());
    s("type", p.kind());
    s("user_id", p.user_id());
    s("app_id", p.app_id());
    s("cluster_id", p.cluster_id());
    if let Some(h) = p.headers() {
        m.insert("headers".into(), table_to_json(h));
    }
    if let Some(v) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(v));
    }
    if let Some(v) = p.priority() {
        m.insert("priority".into(), json!(v));
    }
    if let Some(v) = p.timestamp() {
        m.insert("timestamp".into(), json!(v));
    }
    Value::Object(m)
}

/// The `properties` object of a publish request. Unknown keys are ignored, as RabbitMQ
/// does; known keys of the wrong type are refused, naming the key.
pub fn properties_from_json(m: &Map<String, Value>) -> ApiResult<AMQPProperties> {
    let mut p = AMQPProperties::default();
    let short = |k: &str| -> ApiResult<Option<ShortString>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 255 => Ok(Some(ShortString::from(s.as_str()))),
            Some(v) => Err(wrong(
                &format!("properties.{k}"),
                "a string of at most 255 bytes",
                v,
            )),
        }
    };
    let int = |k: &str, max: u64| -> ApiResult<Option<u64>> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .filter(|i| *i <= max)
                .map(Some)
                .ok_or_else(|| {
                    wrong(
                        &format!("properties.{k}"),
                        &format!("an integer between 0 and {max}"),
                        v,
                    )
                }),
        }
    };
    if let Some(v) = short("content_type")? {
        p = p.with_content_type(v);
    }
    if let Some(v) = short("content_encoding")? {
        p = p.with_content_encoding(v);
    }
    if let Some(v) = short("correlation_id")? {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = short("reply_to")? {
        p = p.with_reply_to(v);
    }
    if let Some(v) = short("expiration")? {
        p = p.with_expiration(v);
    }
    if let Some(v) = short("message_id")? {
        p = p.with_message_id(v);
    }
    if let Some(v) = short("type")? {
        p = p.with_type(v);
    }
    if let Some(v) = short("user_id")? {
        p = p.with_user_id(v);
    }
    if let Some(v) = short("app_id")? {
        p = p.with_app_id(v);
    }
    if let Some(v) = short("cluster_id")? {
        p = p.with_cluster_id(v);
    }
    if let Some(v) = int("delivery_mode", 2)? {
        p = p.with_delivery_mode(v as u8);
    }
    if let Some(v) = int("priority", 255)? {
        p = p.with_priority(v as u8);
    }
    if let Some(v) = int("timestamp", u64::MAX)? {
        p = p.with_timestamp(v);
    }
    match m.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => p = p.with_headers(map_to_table(h, "properties.headers")?),
        Some(v) => return Err(wrong("properties.headers", "a JSON object", v)),
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_through_json() {
        let j = json!({"s": "x", "i": -5, "f": 1.5, "b": true, "a": [1, "y"], "t": {"n": null}});
        let t = map_to_table(j.as_object().unwrap(), "arguments").unwrap();
        assert!(matches!(
            t.inner().get("i"),
            Some(AMQPValue::LongLongInt(-5))
        ));
        assert_eq!(table_to_json(&t), j);
        let e =
            map_to_table(json!({"big": u64::MAX}).as_object().unwrap(), "arguments").unwrap_err();
        assert!(e.reason.contains("arguments"), "{}", e.reason);
    }

    #[test]
    fn properties_validate_types() {
        let p = properties_from_json(
            json!({"delivery_mode": 2, "headers": {"h": 1}, "content_type": "text/plain", "bogus": 1})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            properties_to_json(&p),
            json!({"delivery_mode": 2, "headers": {"h": 1}, "content_type": "text/plain"})
        );
        let e =
            properties_from_json(json!({"delivery_mode": "x"}).as_object().unwrap()).unwrap_err();
        assert!(e.reason.contains("delivery_mode"), "{}", e.reason);
    }
}
