//! Channel methods on a clustered node. Exchanges, queues and bindings change through the
//! metadata group: the method is validated here, proposed, and answered once the change is
//! committed and applied on this node ([`crate::definitions`]); a queue on another node is
//! reached through a call to its home node ([`crate::remote`]). Either way the answer is
//! produced by a [`Deferred`] future, and the connection handles nothing more of this
//! client until it has been sent, so replies keep their order.

use std::future::Future;
use std::pin::Pin;

use amq_protocol::protocol::{AMQPClass, exchange, queue};
use amq_protocol::types::FieldTable;

use super::Channel;
use crate::definitions::{Change, ChangeError, ExchangeRecord, QueueRecord};
use crate::error::{AmqpError, Result};
use crate::exchange::{Destination, ExchangeKind};
use crate::remote::{Call, Reply};
use crate::store::metadata::{BindingDef, encode_table};
use crate::vhost::RemoteQueue;

/// The answer to a method that waits (for a commit or another node): the reply to send,
/// if any, or the error that closes the channel (or the connection).
pub type Deferred = Pin<Box<dyn Future<Output = Result<Option<AMQPClass>>> + Send>>;

fn change_error(e: ChangeError) -> AmqpError {
    match e {
        ChangeError::Refused(t) => AmqpError::precondition(t),
        ChangeError::Unavailable(t) => AmqpError::internal(t),
    }
}

pub(crate) fn binding_def(
    vhost: &str,
    source: &str,
    dest: &Destination,
    key: &str,
    args: &FieldTable,
) -> BindingDef {
    BindingDef {
        vhost: vhost.to_owned(),
        source: source.to_owned(),
        destination: dest.name().to_owned(),
        destination_is_queue: matches!(dest, Destination::Queue(_)),
        routing_key: key.to_owned(),
        arguments: encode_table(args),
    }
}

impl Channel {
    /// True on a node whose definitions are the cluster's.
    pub(super) fn clustered(&self) -> bool {
        self.ctx().broker.clustered()
    }

    /// The answer still to come, for the connection to wait on.
    pub fn take_deferred(&mut self) -> Option<Deferred> {
        self.deferred.take()
    }

    pub(super) fn defer(
        &mut self,
        ids: (u16, u16),
        answer: impl Future<Output = Result<Option<AMQPClass>>> + Send + 'static,
    ) {
        self.deferred = Some(Box::pin(async move {
            answer.await.map_err(|e| e.on_method(ids.0, ids.1))
        }));
    }

    /// Proposes `change`; `reply` goes out once it is applied here.
    fn propose(&mut self, ids: (u16, u16), change: Change, reply: Option<AMQPClass>) {
        let broker = self.ctx().broker.clone();
        self.defer(ids, async move {
            broker.change(change).await.map_err(change_error)?;
            Ok(reply)
        });
    }

    /// `exchange.declare` of an exchange this node does not have. True if handled here.
    pub(super) fn cluster_declare_exchange(&mut self, d: &exchange::Declare) -> Result<bool> {
        let vhost = self.ctx().vhost.clone();
        if d.passive || !self.clustered() || vhost.exchange(d.exchange.as_str()).is_some() {
            return Ok(false);
        }
        if ExchangeKind::parse(d.kind.as_str()).is_none() {
            return Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{}'",
                d.kind
            )));
        }
        let record = ExchangeRecord {
            vhost: vhost.name.clone(),
            name: d.exchange.to_string(),
            kind: d.kind.to_string(),
            durable: d.durable,
            auto_delete: d.auto_delete,
            internal: d.internal,
            arguments: encode_table(&d.arguments),
        };
        let ok = AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}));
        self.propose(
            (40, 10),
            Change::DeclareExchange(record),
            (!d.nowait).then_some(ok),
        );
        Ok(true)
    }

    /// `exchange.delete`. True if handled here.
    pub(super) fn cluster_delete_exchange(&mut self, d: &exchange::Delete) -> Result<bool> {
        let vhost = self.ctx().vhost.clone();
        let name = d.exchange.as_str();
        if !self.clustered() {
            return Ok(false);
        }
        let Some(e) = vhost.exchange(name) else {
            return Ok(false);
        };
        if d.if_unused && !e.bindings.read().is_empty() {
            return Err(AmqpError::precondition(format!(
                "exchange '{name}' in vhost '{}' in use",
                vhost.name
            )));
        }
        let change = Change::DeleteExchange {
            vhost: vhost.name.clone(),
            name: name.to_owned(),
        };
        let ok = AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}));
        self.propose((40, 20), change, (!d.nowait).then_some(ok));
        Ok(true)
    }

    /// A binding added or removed (exchange or queue bind/unbind): through the metadata
    /// group on a clustered node, else here; `reply` once done.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn change_binding(
        &mut self,
        ids: (u16, u16),
        bind: bool,
        source: &str,
        dest: Destination,
        key: &str,
        args: &FieldTable,
        reply: Option<AMQPClass>,
    ) -> Result<()> {
        let vhost = self.ctx().vhost.clone();
        if self.clustered() {
            vhost.check_binding(source, &dest, args)?;
            let def = binding_def(&vhost.name, source, &dest, key, args);
            let change = if bind {
                Change::Bind(def)
            } else {
                Change::Unbind(def)
            };
            self.propose(ids, change, reply);
            return Ok(());
        }
        if bind {
            vhost.bind(source, dest, key, args)?;
        } else {
            vhost.unbind(source, dest, key, args)?;
        }
        if let Some(m) = reply {
            crate::codec::encode_method(&mut self.ctx().outbox.writer(), self.id(), &m);
        }
        Ok(())
    }

    /// `queue.declare` of a queue that is not this connection's exclusive one nor a local
    /// queue: a remote queue is checked and counted by its home node, a new queue is
    /// proposed, to live on this node (`client-local`). True if handled here.
    pub(super) fn cluster_declare_queue(&mut self, d: &queue::Declare, name: &str) -> Result<bool> {
        let vhost = self.ctx().vhost.clone();
        if !self.clustered() || d.exclusive || vhost.queue(name).is_some() {
            return Ok(false);
        }
        let declare_ok = |messages, consumers| {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: name.into(),
                message_count: messages,
                consumer_count: consumers,
            }))
        };
        if let Some(q) = vhost.replicated_queue(name) {
            if !d.passive {
                check_equivalent(&crate::vhost::replicated_record(&q), d, &vhost.name)?;
            }
            let (messages, consumers) = q.counts();
            if !d.nowait {
                crate::codec::encode_method(
                    &mut self.ctx().outbox.writer(),
                    self.id(),
                    &declare_ok(messages, consumers),
                );
            }
            return Ok(true);
        }
        if let Some(r) = vhost.remote_queue(name) {
            if r.exclusive {
                // Another connection's, on another node.
                return Err(vhost.locked(name));
            }
            if !d.passive {
                check_equivalent(&r, d, &vhost.name)?;
            }
            let nowait = d.nowait;
            let (broker, node) = (self.ctx().broker.clone(), r.node.clone());
            let call = Call::Counts {
                vhost: vhost.name.clone(),
                queue: name.to_owned(),
            };
            let name = name.to_owned();
            self.defer((50, 10), async move {
                let (messages, consumers) = match broker.queue_call(&node, call).await? {
                    Reply::Counts {
                        messages,
                        consumers,
                    } => (messages, consumers),
                    other => return Err(AmqpError::internal(format!("{node} answered {other:?}"))),
                };
                Ok((!nowait).then(|| {
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: name.into(),
                        message_count: messages,
                        consumer_count: consumers,
                    }))
                }))
            });
            return Ok(true);
        }
        if d.passive {
            return Ok(false);
        }
        let args = crate::queue::args::parse(&d.arguments, name, &vhost.name)?;
        let broker = &self.ctx().broker;
        let replicas = broker.replicas_for(
            &vhost,
            name,
            d.durable,
            d.auto_delete,
            d.exclusive,
            &d.arguments,
        )?;
        let node = match replicas {
            Some(_) => broker.node_name(),
            None => broker.place_queue(args.locator),
        };
        let mut record = queue_record(&vhost.name, name, d, node, false);
        record.replicas = replicas;
        let ok = (!d.nowait).then(|| declare_ok(0, 0));
        self.propose((50, 10), Change::DeclareQueue(record), ok);
        Ok(true)
    }

    /// A new exclusive queue of this connection is proposed; `declare-ok` waits for the commit.
    /// Should the metadata group refuse it, the queue is removed again.
    pub(super) fn propose_exclusive(&mut self, d: &queue::Declare, name: &str) {
        let vhost = self.ctx().vhost.clone();
        let record = queue_record(&vhost.name, name, d, self.ctx().broker.node_name(), true);
        let broker = self.ctx().broker.clone();
        let ok = (!d.nowait).then(|| {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: name.into(),
                message_count: 0,
                consumer_count: 0,
            }))
        });
        let name = name.to_owned();
        self.defer((50, 10), async move {
            if let Err(e) = broker.change(Change::DeclareQueue(record)).await {
                vhost.remove_queue_here(&name);
                return Err(change_error(e));
            }
            Ok(ok)
        });
    }

    /// `queue.purge` of a queue on another node. True if handled here.
    pub(super) fn cluster_purge(&mut self, name: &str, nowait: bool) -> Result<bool> {
        let vhost = self.ctx().vhost.clone();
        if let Some(q) = vhost.replicated_queue(name) {
            self.purge_replicated(q, nowait);
            return Ok(true);
        }
        let Some(r) = vhost
            .remote_queue(name)
            .filter(|_| vhost.queue(name).is_none())
        else {
            return Ok(false);
        };
        let broker = self.ctx().broker.clone();
        let call = Call::Purge {
            vhost: vhost.name.clone(),
            queue: name.to_owned(),
        };
        self.defer((50, 30), async move {
            let n = match broker.queue_call(&r.node, call).await? {
                Reply::Purged(n) => n,
                other => {
                    return Err(AmqpError::internal(format!(
                        "{} answered {other:?}",
                        r.node
                    )));
                }
            };
            Ok(
                (!nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::PurgeOk(
                    queue::PurgeOk { message_count: n },
                ))),
            )
        });
        Ok(true)
    }

    /// `queue.delete` of a queue the cluster knows (local but not exclusive, or remote).
    /// True if handled here.
    pub(super) fn cluster_delete_queue(&mut self, d: &queue::Delete, name: &str) -> Result<bool> {
        let vhost = self.ctx().vhost.clone();
        if !self.clustered() {
            return Ok(false);
        }
        let change = Change::DeleteQueue {
            vhost: vhost.name.clone(),
            name: name.to_owned(),
        };
        let delete_ok = |n| {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                message_count: n,
            }))
        };
        let in_use =
            || AmqpError::precondition(format!("queue '{name}' in vhost '{}' in use", vhost.name));
        let not_empty = || {
            AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' not empty",
                vhost.name
            ))
        };
        if let Some(q) = vhost.queue(name) {
            if q.exclusive_owner.is_some() {
                return Ok(false);
            }
            let (ready, _, consumers) = q.counts();
            if d.if_unused && consumers > 0 {
                return Err(in_use());
            }
            if d.if_empty && ready > 0 {
                return Err(not_empty());
            }
            let n = q.message_count();
            self.propose((50, 40), change, (!d.nowait).then(|| delete_ok(n)));
            return Ok(true);
        }
        if let Some(q) = vhost.replicated_queue(name) {
            let (ready, consumers) = q.counts();
            if d.if_unused && consumers > 0 {
                return Err(in_use());
            }
            if d.if_empty && ready > 0 {
                return Err(not_empty());
            }
            self.propose((50, 40), change, (!d.nowait).then(|| delete_ok(ready)));
            return Ok(true);
        }
        let Some(r) = vhost.remote_queue(name) else {
            return Ok(false);
        };
        let (if_unused, if_empty, nowait) = (d.if_unused, d.if_empty, d.nowait);
        let broker = self.ctx().broker.clone();
        let call = Call::Counts {
            vhost: vhost.name.clone(),
            queue: name.to_owned(),
        };
        let (in_use, not_empty) = (in_use(), not_empty());
        self.defer((50, 40), async move {
            // Its home node down: it is deleted anyway, as RabbitMQ deletes a classic queue
            // whose node is gone.
            let (messages, consumers) = match broker.queue_call(&r.node, call).await {
                Ok(Reply::Counts {
                    messages,
                    consumers,
                }) => (messages, consumers),
                _ => (0, 0),
            };
            if if_unused && consumers > 0 {
                return Err(in_use);
            }
            if if_empty && messages > 0 {
                return Err(not_empty);
            }
            broker.change(change).await.map_err(change_error)?;
            Ok(
                (!nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(
                    queue::DeleteOk {
                        message_count: messages,
                    },
                ))),
            )
        });
        Ok(true)
    }
}

/// The cluster's record of a queue `queue.declare` creates on `node`.
fn queue_record(
    vhost: &str,
    name: &str,
    d: &queue::Declare,
    node: String,
    exclusive: bool,
) -> QueueRecord {
    QueueRecord {
        vhost: vhost.to_owned(),
        name: name.to_owned(),
        durable: d.durable,
        auto_delete: d.auto_delete,
        arguments: encode_table(&d.arguments),
        node,
        exclusive,
        replicas: None,
    }
}

/// A redeclare of a queue living elsewhere must match how it was declared.
fn check_equivalent(r: &RemoteQueue, d: &queue::Declare, vhost: &str) -> Result<()> {
    let mismatch = |arg: &str, got: bool, current: bool| {
        AmqpError::precondition(format!(
            "inequivalent arg '{arg}' for queue '{}' in vhost '{vhost}': received '{got}' but current is '{current}'",
            r.name
        ))
    };
    if r.durable != d.durable {
        return Err(mismatch("durable", d.durable, r.durable));
    }
    if r.auto_delete != d.auto_delete {
        return Err(mismatch("auto_delete", d.auto_delete, r.auto_delete));
    }
    crate::queue::args::check_equivalent(&r.arguments, &d.arguments, &r.name, vhost)
}
