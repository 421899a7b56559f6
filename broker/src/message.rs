//! A message as the broker holds it: routing information, properties, the encoded content
//! header and the body. Shared (`Arc`) between every queue it was routed to, so a fanout to
//! many queues stores one copy.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;

use crate::codec::encode_header_payload;

#[derive(Debug)]
pub struct Message {
    pub exchange: String,
    pub routing_key: String,
    pub properties: AMQPProperties,
    /// The content header frame payload, encoded once from `properties`.
    pub header_payload: Bytes,
    pub body: Bytes,
}

impl Message {
    pub fn new(
        exchange: String,
        routing_key: String,
        properties: AMQPProperties,
        body: Bytes,
    ) -> Self {
        let header_payload = encode_header_payload(body.len() as u64, &properties);
        Self::with_header_payload(exchange, routing_key, properties, header_payload, body)
    }

    /// A message whose content header payload is already encoded (as received from the
    /// publisher, when the broker changed no property): no re-encoding per message.
    pub fn with_header_payload(
        exchange: String,
        routing_key: String,
        properties: AMQPProperties,
        header_payload: Bytes,
        body: Bytes,
    ) -> Self {
        Self {
            exchange,
            routing_key,
            properties,
            header_payload,
            body,
        }
    }

    pub fn persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(2)
    }

    pub fn priority(&self) -> u8 {
        self.properties.priority().unwrap_or(0)
    }

    /// The per-message TTL in milliseconds, if the `expiration` property holds a valid one.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
    }

    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// The routing keys a sender selected with the `CC` and `BCC` headers.
    pub fn sender_selected_keys(headers: Option<&FieldTable>) -> Vec<String> {
        let mut keys = Vec::new();
        if let Some(h) = headers {
            for name in ["CC", "BCC"] {
                if let Some(AMQPValue::FieldArray(arr)) = h.inner().get(name) {
                    for v in arr.as_slice() {
                        if let Some(s) = value_as_string(v) {
                            keys.push(s);
                        }
                    }
                }
            }
        }
        keys
    }

    /// Size accounted against `x-max-length-bytes`: the body, as RabbitMQ counts it.
    pub fn size(&self) -> u64 {
        self.body.len() as u64
    }
}

pub fn value_as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Copies `props` with a new header table (or none) and, optionally, without `expiration`.
/// `AMQPProperties` has setters but no way to clear a field, hence the rebuild.
pub fn rebuild_properties(
    props: &AMQPProperties,
    headers: Option<FieldTable>,
    keep_expiration: bool,
) -> AMQPProperties {
    let mut p = AMQPProperties::default();
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(h) = headers {
        p = p.with_headers(h);
    }
    if let Some(v) = props.delivery_mode() {
        p = p.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if keep_expiration && let Some(v) = props.expiration() {
        p = p.with_expiration(v.clone());
    }
    if let Some(v) = props.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        p = p.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}
