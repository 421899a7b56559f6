//! Merges a user's override into an object the operator built, in the spirit of a
//! Kubernetes strategic merge patch: maps merge key by key, lists whose items all have a
//! `name` merge item by item (containers, volumes, env, ports), other lists are replaced,
//! and `null` deletes a key.

use serde_json::Value;

pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(existing) = b.get_mut(k) {
                    merge(existing, v);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(b), Value::Array(o)) if named(b) && named(o) => {
            for item in o {
                let name = item.get("name");
                match b.iter_mut().find(|x| x.get("name") == name) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn named(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_merge_and_null_deletes() {
        let mut a = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut a, &json!({"b": {"c": 5, "d": null}, "e": 6}));
        assert_eq!(a, json!({"a": 1, "b": {"c": 5}, "e": 6}));
    }

    #[test]
    fn named_lists_merge_by_name() {
        let mut a = json!({"containers": [{"name": "x", "image": "i", "env": [{"name": "A", "value": "1"}]}]});
        merge(
            &mut a,
            &json!({"containers": [
                {"name": "x", "env": [{"name": "B", "value": "2"}]},
                {"name": "sidecar", "image": "s"}
            ]}),
        );
        assert_eq!(
            a,
            json!({"containers": [
                {"name": "x", "image": "i", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "sidecar", "image": "s"}
            ]})
        );
    }

    #[test]
    fn other_lists_are_replaced() {
        let mut a = json!({"args": ["a", "b"]});
        merge(&mut a, &json!({"args": ["c"]}));
        assert_eq!(a, json!({"args": ["c"]}));
    }
}
