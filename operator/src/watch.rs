//! The watches of one scope (a namespace, or every namespace) that several controllers share,
//! and the trimming every cached object gets.
//!
//! Each controller used to open its own watches of Secrets and RabbitClusters (and Users for
//! the kinds that name one): twelve controllers, so twelve caches of the same objects and
//! three dozen long-lived HTTP connections per scope. Here each of those kinds is watched
//! once per scope; controllers subscribe to it ([`Shared::triggers`]) and read one cache.
//!
//! Cached objects lose their `managedFields` (no reconcile reads them; they are often the
//! larger part of an object), and Secrets are watched as metadata only: the API server
//! sends names, labels and owners, never `data`.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ReflectHandle, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::crd::{RabbitCluster, User};

/// Events a shared cache holds for subscribers that have not read them yet; a full buffer
/// makes the watch wait for the slowest controller (every controller reads its triggers as
/// they come, so this only smooths bursts such as the initial list).
const SHARED_BUFFER: usize = 1024;

/// Drops what no reconcile reads from an object before it is cached.
pub fn trim<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// The API of `K` in one namespace, or in every namespace (`None`).
pub fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A watch of `K` through `api` (with the usual backoff on errors), trimmed.
pub fn trimmed_watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config).default_backoff().modify(trim::<K>)
}

/// A cache of `K` filled by one watch, read by any number of controllers.
struct SharedCache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    writer: Writer<K>,
    subscribers: usize,
}

impl<K> SharedCache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn new() -> Self {
        Self {
            writer: Writer::new_shared(SHARED_BUFFER, ()),
            subscribers: 0,
        }
    }

    fn subscribe(&mut self) -> (ReflectHandle<K>, Store<K>) {
        self.subscribers += 1;
        let handle = self
            .writer
            .subscribe()
            .expect("a writer made by new_shared can be subscribed to");
        (handle, self.writer.as_reader())
    }

    /// Drives the watch into the cache and to the subscribers, until the watch ends; at once
    /// when nobody subscribed (a shared writer nobody reads would fill up and stall).
    fn run<S>(self, events: S) -> Pin<Box<dyn Future<Output = ()> + Send>>
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
        K: Send + Sync,
    {
        if self.subscribers == 0 {
            return Box::pin(std::future::ready(()));
        }
        Box::pin(
            reflector::reflector(self.writer, events).for_each(|event| async move {
                if let Err(e) = event {
                    tracing::warn!("shared watch: {e}");
                }
            }),
        )
    }
}

/// What a controller subscribes to: the scope's Secrets (metadata), RabbitClusters and Users.
pub struct Triggers {
    pub secrets: ReflectHandle<PartialObjectMeta<Secret>>,
    pub clusters: ReflectHandle<RabbitCluster>,
    /// The scope's RabbitClusters as cached (the cluster controller's own store).
    pub cluster_store: Store<RabbitCluster>,
    /// Only for the kinds that name a User resource.
    pub users: Option<ReflectHandle<User>>,
}

/// The shared watches of one scope. Subscribe every controller ([`Shared::triggers`])
/// before [`Shared::run`]: a subscriber only sees what is watched after it subscribed.
pub struct Shared {
    client: Client,
    namespace: Option<String>,
    secrets: SharedCache<PartialObjectMeta<Secret>>,
    clusters: SharedCache<RabbitCluster>,
    users: SharedCache<User>,
}

impl Shared {
    pub fn new(client: Client, namespace: Option<String>) -> Self {
        Self {
            client,
            namespace,
            secrets: SharedCache::new(),
            clusters: SharedCache::new(),
            users: SharedCache::new(),
        }
    }

    /// A controller's subscriptions (`users` for the kinds that follow User resources).
    pub fn triggers(&mut self, users: bool) -> Triggers {
        let (secrets, _) = self.secrets.subscribe();
        let (clusters, cluster_store) = self.clusters.subscribe();
        Triggers {
            secrets,
            clusters,
            cluster_store,
            users: users.then(|| self.users.subscribe().0),
        }
    }

    /// Runs the watches until they end (they do not, short of the process ending).
    pub async fn run(self) {
        // `Api<PartialObjectMeta<_>>` asks the API server for metadata only.
        let secrets = trimmed_watch(
            scoped::<PartialObjectMeta<Secret>>(&self.client, &self.namespace),
            watcher::Config::default(),
        );
        let clusters = trimmed_watch(
            scoped::<RabbitCluster>(&self.client, &self.namespace),
            watcher::Config::default(),
        );
        let users = trimmed_watch(
            scoped::<User>(&self.client, &self.namespace),
            watcher::Config::default(),
        );
        tokio::join!(
            self.secrets.run(secrets),
            self.clusters.run(clusters),
            self.users.run(users),
        );
    }
}
