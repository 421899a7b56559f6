//! The Kubernetes operator for Warren. Filled in by the operator issues; empty on purpose until then.
