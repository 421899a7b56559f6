//! Headers exchange matching: `x-match` = `all` (default), `any`, `all-with-x`, `any-with-x`.
//! Binding arguments starting with `x-` are ignored unless the mode ends in `-with-x`; a binding
//! argument of type void only requires the header to be present.

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::message::value_as_string;

fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    use crate::queue::args::as_int;
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (value_as_string(a), value_as_string(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// Binding arguments of a headers exchange: `x-match`, if given, must be a known mode.
pub fn validate(binding_args: &FieldTable) -> crate::error::Result<()> {
    let Some(v) = binding_args.inner().get("x-match") else {
        return Ok(());
    };
    match value_as_string(v).as_deref() {
        Some("all" | "any" | "all-with-x" | "any-with-x") => Ok(()),
        other => Err(crate::error::AmqpError::precondition(format!(
            "Invalid x-match field value <<\"{}\">>; expected all, any, all-with-x, or any-with-x",
            other.unwrap_or_default()
        ))),
    }
}

pub fn matches(binding_args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = binding_args
        .inner()
        .get("x-match")
        .and_then(value_as_string)
        .unwrap_or_else(|| "all".into());
    let any = mode.starts_with("any");
    let with_x = mode.ends_with("-with-x");
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty);
    for (k, v) in binding_args.inner() {
        if k.as_str() == "x-match" || (!with_x && k.as_str().starts_with("x-")) {
            continue;
        }
        let hit = match headers.inner().get(k.as_str()) {
            None => false,
            Some(h) => matches!(v, AMQPValue::Void) || values_equal(v, h),
        };
        if any && hit {
            return true;
        }
        if !any && !hit {
            return false;
        }
    }
    // `all`: every argument matched (or there were none); `any`: none matched.
    !any
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn all_and_any() {
        let s = |x: &str| AMQPValue::LongString(x.into());
        let all = t(&[
            ("x-match", s("all")),
            ("a", s("1")),
            ("b", AMQPValue::LongInt(2)),
        ]);
        let any = t(&[
            ("x-match", s("any")),
            ("a", s("1")),
            ("b", AMQPValue::LongInt(2)),
        ]);
        let h_both = t(&[("a", s("1")), ("b", AMQPValue::ShortShortUInt(2))]);
        let h_one = t(&[("a", s("1"))]);
        assert!(matches(&all, Some(&h_both)));
        assert!(!matches(&all, Some(&h_one)));
        assert!(matches(&any, Some(&h_one)));
        assert!(!matches(&any, None));
        assert!(matches(&t(&[]), None));
        let x = t(&[("x-match", s("all")), ("x-k", s("v"))]);
        assert!(matches(&x, None));
        let wx = t(&[("x-match", s("all-with-x")), ("x-k", s("v"))]);
        assert!(!matches(&wx, None));
        assert!(matches(&wx, Some(&t(&[("x-k", s("v"))]))));
        let present = t(&[("a", AMQPValue::Void)]);
        assert!(matches(&present, Some(&t(&[("a", s("anything"))]))));
    }
}
