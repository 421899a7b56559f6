//! End-to-end test harness for Warren (multi-node clusters, Kubernetes control plane). Filled in by later issues.
