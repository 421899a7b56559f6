//! Queue arguments (`x-message-ttl`, `x-max-length`, …): validation and the equivalence check
//! RabbitMQ applies when a queue is declared again.

use amq_protocol::types::{AMQPValue, FieldTable};

use super::state::{Overflow, QueueConfig};
use crate::error::{AmqpError, Result};

/// An integer argument of any AMQP integer type.
pub fn as_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => *i as i64,
        AMQPValue::ShortShortUInt(i) => *i as i64,
        AMQPValue::ShortInt(i) => *i as i64,
        AMQPValue::ShortUInt(i) => *i as i64,
        AMQPValue::LongInt(i) => *i as i64,
        AMQPValue::LongUInt(i) => *i as i64,
        AMQPValue::LongLongInt(i) => *i,
        AMQPValue::Timestamp(i) => *i as i64,
        _ => return None,
    })
}

fn as_str(v: &AMQPValue) -> Option<String> {
    crate::message::value_as_string(v)
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
    pub config: QueueConfig,
    pub expires: Option<u64>,
    pub single_active_consumer: bool,
    pub queue_type: Option<String>,
    /// Where a clustered node places a new queue (`x-queue-leader-locator`, or RabbitMQ 3's
    /// `x-queue-master-locator`).
    pub locator: Locator,
}

/// Which node a new queue lives on in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locator {
    /// The node of the declaring client (RabbitMQ's default).
    #[default]
    ClientLocal,
    /// The running node holding the fewest queues (`balanced`, or 3.x's `min-masters`).
    Balanced,
    /// Any running node (`random`).
    Random,
}

fn invalid(arg: &str, queue: &str, vhost: &str, why: impl std::fmt::Display) -> AmqpError {
    AmqpError::precondition(format!(
        "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}': {why}"
    ))
}

/// Parses and validates queue arguments. Unknown `x-` arguments are ignored, as in RabbitMQ.
pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<QueueArgs> {
    let mut out = QueueArgs::default();
    for (k, v) in args.inner() {
        let k = k.as_str();
        let int = |min: i64, max: i64| -> Result<u64> {
            let i = as_int(v).ok_or_else(|| {
                invalid(
                    k,
                    queue,
                    vhost,
                    format!("\"expected integer, got {}\"", type_name(v)),
                )
            })?;
            if i < min {
                return Err(invalid(k, queue, vhost, format!("{{value_negative,{i}}}")));
            }
            if i > max {
                return Err(invalid(
                    k,
                    queue,
                    vhost,
                    format!("{{max_value_exceeded,{i}}}"),
                ));
            }
            Ok(i as u64)
        };
        let string = || -> Result<String> {
            as_str(v).ok_or_else(|| {
                invalid(
                    k,
                    queue,
                    vhost,
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                )
            })
        };
        match k {
            "x-message-ttl" => out.config.message_ttl = Some(int(0, u32::MAX as i64)?),
            "x-expires" => {
                let e = int(0, u32::MAX as i64)?;
                if e == 0 {
                    return Err(invalid(k, queue, vhost, "{value_zero,0}"));
                }
                out.expires = Some(e);
            }
            "x-max-length" => out.config.max_length = Some(int(0, i64::MAX)?),
            "x-max-length-bytes" => out.config.max_length_bytes = Some(int(0, i64::MAX)?),
            "x-max-priority" => {
                let p = int(0, 255)?;
                out.config.max_priority = Some(p as u8);
            }
            "x-overflow" => {
                out.config.overflow = match string()?.as_str() {
                    "drop-head" => Overflow::DropHead,
                    "reject-publish" => Overflow::RejectPublish,
                    "reject-publish-dlx" => Overflow::RejectPublishDlx,
                    _ => {
                        return Err(invalid(k, queue, vhost, "invalid_overflow"));
                    }
                }
            }
            "x-queue-leader-locator" | "x-queue-master-locator" => {
                out.locator = match string()?.as_str() {
                    "client-local" => Locator::ClientLocal,
                    "balanced" | "min-masters" => Locator::Balanced,
                    "random" => Locator::Random,
                    other => {
                        return Err(invalid(
                            k,
                            queue,
                            vhost,
                            format!(
                                "'{other}' is not a queue locator (client-local, balanced, \
                                 min-masters, random)"
                            ),
                        ));
                    }
                }
            }
            "x-dead-letter-exchange" => out.config.dead_letter_exchange = Some(string()?),
            "x-dead-letter-routing-key" => out.config.dead_letter_routing_key = Some(string()?),
            "x-single-active-consumer" => match v {
                AMQPValue::Boolean(b) => out.single_active_consumer = *b,
                _ => {
                    return Err(invalid(
                        k,
                        queue,
                        vhost,
                        format!("{{unacceptable_type,{}}}", type_name(v)),
                    ));
                }
            },
            "x-queue-type" => {
                let t = string()?;
                if t != "classic" && t != "quorum" {
                    return Err(invalid(
                        k,
                        queue,
                        vhost,
                        format!("\"unsupported queue type '{t}'\""),
                    ));
                }
                out.queue_type = Some(t);
            }
            _ => {}
        }
    }
    if out.config.dead_letter_routing_key.is_some() && out.config.dead_letter_exchange.is_none() {
        return Err(AmqpError::precondition(format!(
            "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': Key 'x-dead-letter-exchange' is mandatory if 'x-dead-letter-routing-key' is set"
        )));
    }
    Ok(out)
}

fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "double",
        AMQPValue::Void => "void",
        _ => "long",
    }
}

/// The arguments compared on redeclaration (RabbitMQ's list, minus those it tolerates).
const COMPARED: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-single-active-consumer",
    "x-queue-type",
];

fn normalise(v: Option<&AMQPValue>) -> Option<String> {
    v.map(|v| match as_int(v) {
        Some(i) => i.to_string(),
        None => match v {
            AMQPValue::Boolean(b) => b.to_string(),
            other => as_str(other).unwrap_or_else(|| format!("{other:?}")),
        },
    })
}

/// 406 if a redeclaration's arguments differ from the existing queue's.
pub fn check_equivalent(
    existing: &FieldTable,
    new: &FieldTable,
    queue: &str,
    vhost: &str,
) -> Result<()> {
    for k in COMPARED {
        let a = normalise(existing.inner().get(*k));
        let b = normalise(new.inner().get(*k));
        // x-queue-type classic is the default; omitting it is equivalent.
        if *k == "x-queue-type"
            && a.as_deref().unwrap_or("classic") == b.as_deref().unwrap_or("classic")
        {
            continue;
        }
        if a != b {
            // RabbitMQ names the type only when one side is missing.
            let one_missing = a.is_none() || b.is_none();
            return Err(AmqpError::precondition(format!(
                "inequivalent arg '{k}' for queue '{queue}' in vhost '{vhost}': received {} but current is {}",
                describe(&b, new.inner().get(*k), one_missing),
                describe(&a, existing.inner().get(*k), one_missing)
            )));
        }
    }
    Ok(())
}

fn describe(v: &Option<String>, raw: Option<&AMQPValue>, typed: bool) -> String {
    match (v, raw) {
        (Some(s), Some(raw)) if typed => {
            format!("the value '{s}' of type '{}'", rabbit_type_name(raw))
        }
        (Some(s), _) => format!("'{s}'"),
        (None, _) => "none".into(),
    }
}

/// RabbitMQ's names for AMQP field types, as they appear in its error texts.
fn rabbit_type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn parses_and_validates() {
        let a = parse(
            &table(&[
                ("x-message-ttl", AMQPValue::LongInt(100)),
                ("x-max-length", AMQPValue::ShortShortUInt(3)),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("dlx".into()),
                ),
            ]),
            "q",
            "/",
        )
        .unwrap();
        assert_eq!(a.config.message_ttl, Some(100));
        assert_eq!(a.config.overflow, Overflow::RejectPublish);
        let e = parse(
            &table(&[("x-max-length", AMQPValue::LongInt(-1))]),
            "q",
            "/",
        )
        .unwrap_err();
        assert_eq!(e.code, 406);
        let e = parse(
            &table(&[("x-message-ttl", AMQPValue::LongString("x".into()))]),
            "q",
            "/",
        )
        .unwrap_err();
        assert!(e.text.contains("x-message-ttl"));
        assert!(
            parse(
                &table(&[("x-max-priority", AMQPValue::LongInt(256))]),
                "q",
                "/"
            )
            .is_err()
        );
        assert!(
            parse(
                &table(&[("x-overflow", AMQPValue::LongString("nope".into()))]),
                "q",
                "/"
            )
            .is_err()
        );
    }

    #[test]
    fn equivalence_ignores_integer_type() {
        let a = table(&[("x-max-length", AMQPValue::LongInt(3))]);
        let b = table(&[("x-max-length", AMQPValue::LongLongInt(3))]);
        assert!(check_equivalent(&a, &b, "q", "/").is_ok());
        let c = table(&[("x-max-length", AMQPValue::LongInt(4))]);
        assert_eq!(check_equivalent(&a, &c, "q", "/").unwrap_err().code, 406);
        assert!(check_equivalent(&a, &FieldTable::default(), "q", "/").is_err());
    }
}
