//! Building a dead-lettered message: the `x-death` history and the `x-first-death-*` /
//! `x-last-death-*` headers, exactly as RabbitMQ writes them. Pure: the time comes in.

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

use crate::message::{Message, rebuild_properties, value_as_string};
use crate::queue::state::DeadLetterReason;

fn lstr(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The routing keys a message was published with: its routing key and its `CC` keys.
fn original_keys(msg: &Message) -> Vec<String> {
    let mut keys = vec![msg.routing_key.clone()];
    if let Some(AMQPValue::FieldArray(cc)) = msg.headers().and_then(|h| h.inner().get("CC")) {
        keys.extend(cc.as_slice().iter().filter_map(value_as_string));
    }
    keys
}

/// Returns the message to publish to the dead-letter exchange and the routing keys to use.
pub fn dead_letter(
    msg: &Message,
    queue: &str,
    reason: DeadLetterReason,
    now_secs: u64,
    dlx: &str,
    dl_routing_key: Option<&str>,
) -> (Message, Vec<String>) {
    let keys = original_keys(msg);
    let mut headers = msg.headers().cloned().unwrap_or_default();

    let mut entry = FieldTable::default();
    entry.insert("count".into(), AMQPValue::LongLongInt(1));
    entry.insert("reason".into(), lstr(reason.as_str()));
    entry.insert("queue".into(), lstr(queue));
    entry.insert("time".into(), AMQPValue::Timestamp(now_secs));
    entry.insert("exchange".into(), lstr(&msg.exchange));
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(
            keys.iter().map(|k| lstr(k)).collect::<Vec<_>>(),
        )),
    );
    if let Some(exp) = msg.properties.expiration() {
        entry.insert("original-expiration".into(), lstr(exp.as_str()));
    }

    // An existing entry for the same queue and reason is counted up and moved to the front.
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        t.inner().get("queue").and_then(value_as_string).as_deref() == Some(queue)
            && t.inner().get("reason").and_then(value_as_string).as_deref() == Some(reason.as_str())
    };
    if let Some(pos) = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)))
        && let AMQPValue::FieldTable(old) = deaths.remove(pos)
    {
        let count = old
            .inner()
            .get("count")
            .and_then(crate::queue::args::as_int)
            .unwrap_or(0);
        entry.insert("count".into(), AMQPValue::LongLongInt(count + 1));
    }
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );

    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), lstr(reason.as_str()));
        headers.insert("x-first-death-queue".into(), lstr(queue));
        headers.insert("x-first-death-exchange".into(), lstr(&msg.exchange));
    }
    headers.insert("x-last-death-reason".into(), lstr(reason.as_str()));
    headers.insert("x-last-death-queue".into(), lstr(queue));
    headers.insert("x-last-death-exchange".into(), lstr(&msg.exchange));

    let route_keys = match dl_routing_key {
        Some(k) => {
            // A dead-letter routing key replaces the original keys, CC included.
            let mut t = FieldTable::default();
            for (k2, v) in headers.inner() {
                if k2.as_str() != "CC" {
                    t.insert(k2.clone(), v.clone());
                }
            }
            headers = t;
            vec![k.to_owned()]
        }
        None => keys,
    };
    let props = rebuild_properties(&msg.properties, Some(headers), false);
    let rk = route_keys.first().cloned().unwrap_or_default();
    (
        Message::new(dlx.to_owned(), rk, props, msg.body.clone()),
        route_keys,
    )
}

/// Dead-lettering `msg` into `target` would loop without any rejection on the way: drop it.
pub fn is_cycle(msg: &Message, target: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = msg.headers().and_then(|h| h.inner().get("x-death"))
    else {
        return false;
    };
    let mut seen_target = false;
    for d in deaths.as_slice() {
        if let AMQPValue::FieldTable(t) = d {
            if t.inner().get("reason").and_then(value_as_string).as_deref() == Some("rejected") {
                return false;
            }
            if t.inner().get("queue").and_then(value_as_string).as_deref() == Some(target) {
                seen_target = true;
            }
        }
    }
    seen_target
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;

    fn get<'a>(t: &'a FieldTable, k: &str) -> &'a AMQPValue {
        t.inner().get(k).unwrap()
    }

    #[test]
    fn x_death_history() {
        let props = AMQPProperties::default().with_expiration("500".into());
        let m = Message::new(
            "ex".into(),
            "rk".into(),
            props,
            bytes::Bytes::from_static(b"b"),
        );
        let (d1, keys) = dead_letter(&m, "q1", DeadLetterReason::Expired, 10, "dlx", None);
        assert_eq!(keys, vec!["rk".to_string()]);
        assert!(d1.properties.expiration().is_none());
        let h = d1.headers().unwrap();
        let AMQPValue::FieldArray(deaths) = get(h, "x-death") else {
            panic!()
        };
        let AMQPValue::FieldTable(e) = &deaths.as_slice()[0] else {
            panic!()
        };
        assert_eq!(get(e, "count"), &AMQPValue::LongLongInt(1));
        assert_eq!(get(e, "original-expiration"), &lstr("500"));
        assert_eq!(get(h, "x-first-death-queue"), &lstr("q1"));

        // Second death in another queue, then again in q1 for the same reason.
        let (d2, _) = dead_letter(
            &d1,
            "q2",
            DeadLetterReason::Rejected,
            11,
            "dlx2",
            Some("k2"),
        );
        let (d3, _) = dead_letter(&d2, "q1", DeadLetterReason::Expired, 12, "dlx", None);
        let h = d3.headers().unwrap();
        let AMQPValue::FieldArray(deaths) = get(h, "x-death") else {
            panic!()
        };
        assert_eq!(deaths.as_slice().len(), 2);
        let AMQPValue::FieldTable(first) = &deaths.as_slice()[0] else {
            panic!()
        };
        assert_eq!(get(first, "queue"), &lstr("q1"));
        assert_eq!(get(first, "count"), &AMQPValue::LongLongInt(2));
        assert_eq!(get(h, "x-first-death-queue"), &lstr("q1"));
        assert_eq!(get(h, "x-last-death-queue"), &lstr("q1"));
        assert_eq!(get(h, "x-last-death-reason"), &lstr("expired"));
    }

    #[test]
    fn cycles_without_rejection_are_detected() {
        let m = Message::new(
            "".into(),
            "q1".into(),
            AMQPProperties::default(),
            bytes::Bytes::new(),
        );
        let (d, _) = dead_letter(&m, "q1", DeadLetterReason::Expired, 1, "", None);
        assert!(is_cycle(&d, "q1"));
        assert!(!is_cycle(&d, "q2"));
        let (r, _) = dead_letter(&m, "q1", DeadLetterReason::Rejected, 1, "", None);
        assert!(!is_cycle(&r, "q1"));
    }
}
