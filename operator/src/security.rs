//! What the operator refuses to do on a RabbitCluster's behalf unless it was started to allow
//! it: run broker pods with access to their host (privileged containers, the host's network,
//! PID or IPC namespace, hostPath volumes, host ports, capabilities beyond the baseline,
//! another ServiceAccount than the cluster's own), and
//! send the cluster's admin credentials to a management URI outside the cluster's own
//! Services. Whoever may edit a RabbitCluster is not necessarily allowed to do either; the
//! operator's account can, so without these checks it would do it for them.
//!
//! Pure functions over the objects the builders produce: the controllers call them before
//! anything is applied or sent, and report a refusal in the resource's conditions.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::SecurityContext;
use kube::ResourceExt;

use crate::cluster::build;
use crate::crd::RabbitCluster;

/// The cluster DNS domain when `--cluster-domain` is not given.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The operator's allowances (its flags; chart values `security.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Security {
    /// `--allow-privileged-pods`: `spec.override` may give broker pods host access.
    pub allow_privileged_pods: bool,
    /// `--allow-any-management-uri`: the `warren.dev/management-uri` annotation may name any
    /// host (an operator outside the cluster reaching brokers through a proxy or port-forward).
    pub allow_any_management_uri: bool,
    /// `--cluster-domain`: the DNS domain of Services (`<svc>.<ns>.svc.<domain>`).
    pub cluster_domain: String,
}

impl Default for Security {
    /// Everything refused.
    fn default() -> Self {
        Security {
            allow_privileged_pods: false,
            allow_any_management_uri: false,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_string(),
        }
    }
}

const OVERRIDE_POD: &str = "spec.override.statefulSet.spec.template.spec";

/// Capabilities a container may add: the Pod Security Standards' baseline list (what a
/// container runtime grants by default). Any other (`SYS_ADMIN`, `NET_ADMIN`, `SYS_PTRACE`,
/// `ALL` …) reaches into the node.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// What the broker pods of `sts` (built from the cluster's spec and its `spec.override`) would
/// be allowed on their node that the operator does not give them: one entry per field, naming
/// it as the user writes it. Empty when the pods are confined as the operator builds them.
pub fn pod_host_access(rc: &RabbitCluster, sts: &StatefulSet) -> Vec<String> {
    let mut found = Vec::new();
    let Some(pod) = sts.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        return found;
    };
    for (field, on, what) in [
        ("hostNetwork", pod.host_network, "the node's network"),
        ("hostPID", pod.host_pid, "the node's processes"),
        ("hostIPC", pod.host_ipc, "the node's IPC namespace"),
    ] {
        if on == Some(true) {
            found.push(format!(
                "{OVERRIDE_POD}.{field}: true (gives the pods {what})"
            ));
        }
    }
    let own = build::server_name(rc);
    for (field, account) in [
        ("serviceAccountName", &pod.service_account_name),
        ("serviceAccount", &pod.service_account),
    ] {
        if let Some(account) = account.as_deref().filter(|a| *a != own) {
            found.push(format!(
                "{OVERRIDE_POD}.{field}: {account:?} (the pods run as the cluster's own \
                 ServiceAccount {own:?}, which holds no Kubernetes permissions)"
            ));
        }
    }
    for volume in pod.volumes.iter().flatten() {
        if let Some(path) = &volume.host_path {
            found.push(format!(
                "{OVERRIDE_POD}.volumes[name: {}].hostPath: {:?} (mounts the node's files)",
                volume.name, path.path
            ));
        }
    }
    if pod
        .security_context
        .as_ref()
        .and_then(|s| s.windows_options.as_ref())
        .and_then(|w| w.host_process)
        == Some(true)
    {
        found.push(format!(
            "{OVERRIDE_POD}.securityContext.windowsOptions.hostProcess: true (runs on the node itself)"
        ));
    }
    let containers = pod
        .containers
        .iter()
        .map(|c| {
            (
                "containers",
                &c.name,
                c.security_context.as_ref(),
                c.ports.as_deref(),
            )
        })
        .chain(pod.init_containers.iter().flatten().map(|c| {
            (
                "initContainers",
                &c.name,
                c.security_context.as_ref(),
                c.ports.as_deref(),
            )
        }))
        .chain(pod.ephemeral_containers.iter().flatten().map(|c| {
            (
                "ephemeralContainers",
                &c.name,
                c.security_context.as_ref(),
                c.ports.as_deref(),
            )
        }));
    for (list, name, context, ports) in containers {
        for port in ports.unwrap_or_default() {
            if let Some(host_port) = port.host_port.filter(|p| *p != 0) {
                found.push(format!(
                    "{OVERRIDE_POD}.{list}[name: {name}].ports[containerPort: {}].hostPort: {host_port} \
                     (listens on the node's own address)",
                    port.container_port
                ));
            }
        }
        let at = format!("{OVERRIDE_POD}.{list}[name: {name}].securityContext");
        let added: Vec<&str> = context
            .and_then(|c| c.capabilities.as_ref())
            .and_then(|c| c.add.as_deref())
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .filter(|cap| {
                let upper = cap.to_ascii_uppercase();
                let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
                !BASELINE_CAPABILITIES.contains(&bare)
            })
            .collect();
        if !added.is_empty() {
            found.push(format!(
                "{at}.capabilities.add: {added:?} (beyond the baseline a container runtime grants)"
            ));
        }
        if context.and_then(|c: &SecurityContext| c.privileged) == Some(true) {
            found.push(format!(
                "{at}.privileged: true (a privileged container has every device and capability of the node)"
            ));
        }
        if context
            .and_then(|c| c.windows_options.as_ref())
            .and_then(|w| w.host_process)
            == Some(true)
        {
            found.push(format!(
                "{at}.windowsOptions.hostProcess: true (runs on the node itself)"
            ));
        }
    }
    found
}

/// Checks the broker pods of `sts` against the operator's allowances; the error is the message
/// for `ReconcileSuccess`.
pub fn check_pods(
    security: &Security,
    rc: &RabbitCluster,
    sts: &StatefulSet,
) -> Result<(), String> {
    if security.allow_privileged_pods {
        return Ok(());
    }
    let found = pod_host_access(rc, sts);
    if found.is_empty() {
        return Ok(());
    }
    Err(format!(
        "refused: {}. Remove {} from spec.override, or start the operator with \
         --allow-privileged-pods (Helm value security.allowPrivilegedPods: true)",
        found.join("; "),
        if found.len() == 1 { "it" } else { "them" },
    ))
}

/// The host names of the cluster's own Services and pods a management URI may point at,
/// as patterns for messages.
fn own_hosts(rc: &RabbitCluster, domain: &str) -> String {
    let ns = build::namespace(rc);
    let nodes = build::nodes_service_name(rc);
    format!(
        "{client}.{ns}.svc, {nodes}.{ns}.svc or {server}-N.{nodes}.{ns}.svc, each optionally \
         followed by .{domain}",
        client = build::client_service_name(rc),
        server = build::server_name(rc),
    )
}

/// Whether `host` (lower case, without a trailing dot) names one of `rc`'s Services or pods.
fn is_own_host(rc: &RabbitCluster, host: &str, domain: &str) -> bool {
    let Some(rest) = host
        .strip_suffix(&format!(".svc.{domain}"))
        .or_else(|| host.strip_suffix(".svc"))
    else {
        return false;
    };
    let ns = build::namespace(rc);
    let Some(service) = rest.strip_suffix(&format!(".{ns}")) else {
        return false;
    };
    let nodes = build::nodes_service_name(rc);
    if service == build::client_service_name(rc) || service == nodes {
        return true;
    }
    // A pod's name in the headless Service: <name>-server-<ordinal>.<name>-nodes.
    service
        .strip_suffix(&format!(".{nodes}"))
        .and_then(|pod| pod.strip_prefix(&format!("{}-", build::server_name(rc))))
        .is_some_and(|ordinal| !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks the management URI a RabbitCluster's annotation names before the operator sends the
/// cluster's default user (an administrator) to it: its host must be one of the cluster's own
/// Services or pods, unless the operator allows any host. The error names the annotation.
pub fn check_management_uri(
    security: &Security,
    rc: &RabbitCluster,
    annotation: &str,
    uri: &str,
) -> Result<(), String> {
    if security.allow_any_management_uri {
        return Ok(());
    }
    let field = format!("metadata.annotations[\"{annotation}\"]");
    let domain = security
        .cluster_domain
        .trim_matches('.')
        .to_ascii_lowercase();
    let url =
        reqwest::Url::parse(uri).map_err(|e| format!("{field}: {uri:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{field}: {uri:?} must be an http:// or https:// URL"
        ));
    }
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if is_own_host(rc, &host, &domain) {
        return Ok(());
    }
    Err(format!(
        "{field}: host {host:?} is not one of RabbitCluster {}'s own Services ({}); the \
         operator would send the cluster's default user (an administrator) there, so it sends \
         nothing. Point the annotation at the cluster, remove it, or start the operator with \
         --allow-any-management-uri (Helm value security.allowAnyManagementUri: true)",
        rc.name_any(),
        own_hosts(rc, &domain),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::controller::MANAGEMENT_URI_ANNOTATION;
    use crate::crd::cluster::{DEFAULT_IMAGE, RabbitClusterSpec};
    use serde_json::json;

    fn cluster(spec: serde_json::Value) -> RabbitCluster {
        let spec: RabbitClusterSpec = serde_json::from_value(spec).expect("spec");
        let mut rc = RabbitCluster::new("hare", spec);
        rc.metadata.namespace = Some("apps".into());
        rc.metadata.uid = Some("1234".into());
        rc
    }

    fn pod_override(pod: serde_json::Value) -> RabbitCluster {
        cluster(json!({"override": {"statefulSet": {"spec": {"template": {"spec": pod}}}}}))
    }

    fn check(security: &Security, rc: &RabbitCluster) -> Result<(), String> {
        let sts = build::stateful_set(rc, 1, DEFAULT_IMAGE).expect("sts");
        check_pods(security, rc, &sts)
    }

    #[test]
    fn the_operators_own_pods_are_confined() {
        let rc = cluster(json!({}));
        assert_eq!(check(&Security::default(), &rc), Ok(()));
        // An override that changes nothing about host access is fine.
        let rc = pod_override(
            json!({"priorityClassName": "high", "serviceAccountName": "hare-server",
            "volumes": [{"name": "extra", "emptyDir": {}}],
            "containers": [{"name": "warren", "securityContext": {"privileged": false,
                "capabilities": {"add": ["NET_BIND_SERVICE", "cap_chown"]}}}]}),
        );
        assert_eq!(check(&Security::default(), &rc), Ok(()));
    }

    #[test]
    fn overrides_giving_pods_host_access_are_refused_naming_the_field() {
        for (pod, field) in [
            (
                json!({"hostNetwork": true}),
                "spec.override.statefulSet.spec.template.spec.hostNetwork: true",
            ),
            (
                json!({"hostPID": true}),
                "spec.override.statefulSet.spec.template.spec.hostPID: true",
            ),
            (
                json!({"hostIPC": true}),
                "spec.override.statefulSet.spec.template.spec.hostIPC: true",
            ),
            (
                json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                "spec.override.statefulSet.spec.template.spec.volumes[name: root].hostPath: \"/\"",
            ),
            (
                json!({"containers": [{"name": "warren", "securityContext": {"privileged": true}}]}),
                "spec.override.statefulSet.spec.template.spec.containers[name: warren].securityContext.privileged: true",
            ),
            (
                json!({"initContainers": [{"name": "setup", "image": "busybox", "securityContext": {"privileged": true}}]}),
                "spec.override.statefulSet.spec.template.spec.initContainers[name: setup].securityContext.privileged: true",
            ),
            (
                json!({"containers": [{"name": "sidecar", "image": "busybox", "securityContext": {"privileged": true}}]}),
                "containers[name: sidecar].securityContext.privileged: true",
            ),
            (
                json!({"serviceAccountName": "kube-admin"}),
                "spec.override.statefulSet.spec.template.spec.serviceAccountName: \"kube-admin\"",
            ),
            (
                json!({"serviceAccount": "kube-admin"}),
                "spec.override.statefulSet.spec.template.spec.serviceAccount: \"kube-admin\"",
            ),
            (
                json!({"securityContext": {"windowsOptions": {"hostProcess": true}}}),
                "securityContext.windowsOptions.hostProcess: true",
            ),
            (
                json!({"containers": [{"name": "warren", "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN", "cap_net_admin"]}}}]}),
                "containers[name: warren].securityContext.capabilities.add: [\"SYS_ADMIN\", \"cap_net_admin\"]",
            ),
            (
                json!({"containers": [{"name": "warren", "ports": [{"name": "amqp", "containerPort": 5672, "hostPort": 5672}]}]}),
                "containers[name: warren].ports[containerPort: 5672].hostPort: 5672",
            ),
        ] {
            let rc = pod_override(pod.clone());
            let err =
                check(&Security::default(), &rc).expect_err(&format!("{pod} must be refused"));
            assert!(err.contains(field), "{pod}: {err}");
            assert!(err.contains("--allow-privileged-pods"), "{err}");
            assert!(err.contains("security.allowPrivilegedPods"), "{err}");
            // The operator's flag allows it.
            let allowed = Security {
                allow_privileged_pods: true,
                ..Security::default()
            };
            assert_eq!(check(&allowed, &rc), Ok(()), "{pod}");
        }
        // Several at once are all named.
        let rc = pod_override(json!({"hostNetwork": true, "hostPID": true}));
        let err = check(&Security::default(), &rc).expect_err("refused");
        assert!(
            err.contains("hostNetwork") && err.contains("hostPID"),
            "{err}"
        );
    }

    #[test]
    fn management_uris_must_name_the_clusters_own_services() {
        let rc = cluster(json!({}));
        let strict = Security::default();
        let check = |uri: &str| check_management_uri(&strict, &rc, MANAGEMENT_URI_ANNOTATION, uri);
        for ok in [
            "http://hare.apps.svc:15672",
            "https://hare.apps.svc:15671",
            "http://hare.apps.svc.cluster.local:15672",
            "http://HARE.apps.svc.cluster.local.:15672/",
            "http://hare-nodes.apps.svc:15672",
            "http://hare-server-0.hare-nodes.apps.svc:15672",
            "http://hare-server-12.hare-nodes.apps.svc.cluster.local:15672",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for refused in [
            "http://127.0.0.1:15672",
            "http://evil.example.com",
            "http://hare.apps.svc.evil.example.com:15672",
            "http://hare.other.svc:15672",
            "http://other.apps.svc:15672",
            "http://hare.apps:15672",
            "http://hare:15672",
            "http://hare-server-x.hare-nodes.apps.svc:15672",
            "http://evil.hare-nodes.apps.svc:15672",
            "http://hare-server-.hare-nodes.apps.svc:15672",
            "http://hare.apps.svc:15672@evil.example.com/",
            "http://[::1]:15672",
            "ftp://hare.apps.svc",
            "not a url",
        ] {
            let err = check(refused).expect_err(refused);
            assert!(
                err.starts_with("metadata.annotations[\"warren.dev/management-uri\"]"),
                "{refused}: {err}"
            );
        }
        let err = check("http://evil.example.com:80").expect_err("refused");
        assert!(err.contains("\"evil.example.com\""), "{err}");
        assert!(err.contains("hare.apps.svc"), "{err}");
        assert!(err.contains("--allow-any-management-uri"), "{err}");
        assert!(err.contains("security.allowAnyManagementUri"), "{err}");
        // Another cluster domain.
        let other = Security {
            cluster_domain: "corp.internal".into(),
            ..Security::default()
        };
        assert_eq!(
            check_management_uri(
                &other,
                &rc,
                MANAGEMENT_URI_ANNOTATION,
                "http://hare.apps.svc.corp.internal:15672"
            ),
            Ok(())
        );
        assert!(
            check_management_uri(
                &other,
                &rc,
                MANAGEMENT_URI_ANNOTATION,
                "http://hare.apps.svc.cluster.local:15672"
            )
            .is_err()
        );
        // The operator's flag allows any host.
        let open = Security {
            allow_any_management_uri: true,
            ..Security::default()
        };
        assert_eq!(
            check_management_uri(
                &open,
                &rc,
                MANAGEMENT_URI_ANNOTATION,
                "http://127.0.0.1:15672"
            ),
            Ok(())
        );
    }
}
