//! Exchanges and their bindings. Matching a message against one exchange's bindings is a pure
//! function of (type, bindings, routing keys, headers); following exchange-to-exchange bindings
//! and alternate exchanges across the vhost happens in [`crate::vhost`].

pub mod headers;
pub mod topic;

use std::collections::HashMap;

use amq_protocol::types::FieldTable;
use parking_lot::RwLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
    /// `x-federation-upstream`: what a federation downstream declares on its upstream (as
    /// RabbitMQ's federation plugin does). A fanout exchange that passes on only the messages
    /// the downstream has not seen and that have made fewer than `x-max-hops` hops (see
    /// [`crate::links::federation::upstream_exchange_forwards`], applied in
    /// [`crate::vhost::Vhost::route`]).
    FederationUpstream,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            "x-federation-upstream" => Self::FederationUpstream,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::FederationUpstream => "x-federation-upstream",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(n) | Destination::Exchange(n) => n,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// The bindings of one exchange, indexed by routing key for direct exchanges.
#[derive(Debug, Default)]
pub struct Bindings {
    list: Vec<Binding>,
    by_key: HashMap<String, Vec<Destination>>,
}

impl Bindings {
    pub fn list(&self) -> &[Binding] {
        &self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Adds a binding; false if an identical one exists (binding is idempotent).
    pub fn add(&mut self, b: Binding) -> bool {
        if self.list.contains(&b) {
            return false;
        }
        self.by_key
            .entry(b.routing_key.clone())
            .or_default()
            .push(b.destination.clone());
        self.list.push(b);
        true
    }

    pub fn remove(&mut self, b: &Binding) -> bool {
        let Some(pos) = self.list.iter().position(|x| x == b) else {
            return false;
        };
        self.list.remove(pos);
        self.reindex_key(&b.routing_key);
        true
    }

    /// Removes every binding to `dest`.
    pub fn remove_destination(&mut self, dest: &Destination) -> bool {
        let before = self.list.len();
        self.list.retain(|b| &b.destination != dest);
        if self.list.len() == before {
            return false;
        }
        self.by_key.clear();
        for b in &self.list {
            self.by_key
                .entry(b.routing_key.clone())
                .or_default()
                .push(b.destination.clone());
        }
        true
    }

    fn reindex_key(&mut self, key: &str) {
        let dests: Vec<Destination> = self
            .list
            .iter()
            .filter(|b| b.routing_key == key)
            .map(|b| b.destination.clone())
            .collect();
        if dests.is_empty() {
            self.by_key.remove(key);
        } else {
            self.by_key.insert(key.to_owned(), dests);
        }
    }

    /// Destinations matched by one exchange for a message.
    pub fn matching(
        &self,
        kind: ExchangeKind,
        routing_keys: &[&str],
        headers: Option<&FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        self.for_each_match(kind, routing_keys, headers, |d| out.push(d.clone()));
    }

    /// Calls `f` for each destination matched, without allocating (the publish hot path).
    pub fn for_each_match(
        &self,
        kind: ExchangeKind,
        routing_keys: &[&str],
        headers: Option<&FieldTable>,
        mut f: impl FnMut(&Destination),
    ) {
        match kind {
            ExchangeKind::Direct => {
                for k in routing_keys {
                    if let Some(d) = self.by_key.get(*k) {
                        d.iter().for_each(&mut f);
                    }
                }
            }
            ExchangeKind::Fanout | ExchangeKind::FederationUpstream => {
                self.list.iter().for_each(|b| f(&b.destination))
            }
            ExchangeKind::Topic => {
                for b in &self.list {
                    if routing_keys
                        .iter()
                        .any(|k| topic::matches(&b.routing_key, k))
                    {
                        f(&b.destination);
                    }
                }
            }
            ExchangeKind::Headers => {
                for b in &self.list {
                    if headers::matches(&b.arguments, headers) {
                        f(&b.destination);
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The `alternate-exchange` argument (no `x-` prefix, as in RabbitMQ).
    pub alternate: Option<String>,
    /// The alternate exchange a policy gives this exchange (its own argument wins).
    pub policy_alternate: RwLock<Option<String>>,
    pub bindings: RwLock<Bindings>,
}

impl Exchange {
    pub fn new(
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let alternate = arguments
            .inner()
            .get("alternate-exchange")
            .and_then(crate::message::value_as_string);
        Self {
            name: name.to_owned(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate,
            policy_alternate: RwLock::new(None),
            bindings: RwLock::new(Bindings::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: &str) -> Destination {
        Destination::Queue(n.into())
    }

    fn bind(b: &mut Bindings, key: &str, dest: &str) {
        b.add(Binding {
            destination: q(dest),
            routing_key: key.into(),
            arguments: FieldTable::default(),
        });
    }

    #[test]
    fn direct_index_follows_add_and_remove() {
        let mut b = Bindings::default();
        bind(&mut b, "k", "q1");
        bind(&mut b, "k", "q2");
        bind(&mut b, "k", "q2");
        let mut out = vec![];
        b.matching(ExchangeKind::Direct, &["k"], None, &mut out);
        assert_eq!(out, vec![q("q1"), q("q2")]);
        b.remove(&Binding {
            destination: q("q1"),
            routing_key: "k".into(),
            arguments: FieldTable::default(),
        });
        out.clear();
        b.matching(ExchangeKind::Direct, &["k", "other"], None, &mut out);
        assert_eq!(out, vec![q("q2")]);
        b.remove_destination(&q("q2"));
        out.clear();
        b.matching(ExchangeKind::Direct, &["k"], None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn topic_and_fanout() {
        let mut b = Bindings::default();
        bind(&mut b, "a.*", "q1");
        bind(&mut b, "#", "q2");
        let mut out = vec![];
        b.matching(ExchangeKind::Topic, &["a.b"], None, &mut out);
        assert_eq!(out, vec![q("q1"), q("q2")]);
        out.clear();
        b.matching(ExchangeKind::Fanout, &["zzz"], None, &mut out);
        assert_eq!(out.len(), 2);
    }
}
