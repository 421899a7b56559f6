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
pub mod watch;

/// The namespaces `--namespace` names (comma-separated, blanks ignored, duplicates once, in
/// order): `[None]` (every namespace) when it names none.
pub fn watched_namespaces(flag: Option<&str>) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = Vec::new();
    for ns in flag.unwrap_or_default().split(',').map(str::trim) {
        if !ns.is_empty() && !out.iter().any(|o| o.as_deref() == Some(ns)) {
            out.push(Some(ns.to_string()));
        }
    }
    if out.is_empty() {
        out.push(None);
    }
    out
}

/// Selects rustls' crypto provider for the whole process (several are linked in through
/// dependencies, so rustls cannot pick one by itself). Call before any TLS client is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn watched_namespaces() {
        use super::watched_namespaces as w;
        assert_eq!(w(None), vec![None]);
        assert_eq!(w(Some(" , ")), vec![None]);
        assert_eq!(w(Some("a")), vec![Some("a".to_string())]);
        assert_eq!(
            w(Some("a, b,a,,c ")),
            vec![Some("a".into()), Some("b".into()), Some("c".into())]
        );
    }
}
