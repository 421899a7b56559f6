//! The Kubernetes operator for Warren: custom resource types, the pure builders of the
//! objects a `RabbitCluster` owns, and the controllers.

pub mod cluster;
pub mod conditions;
pub mod crd;
pub mod lease;
pub mod management;
pub mod metrics;
pub mod reconcile;
pub mod security;
pub mod topology;

/// Selects rustls' crypto provider for the whole process (several are linked in through
/// dependencies, so rustls cannot pick one by itself). Call before any TLS client is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
