#![allow(clippy::unwrap_used)]
//! The default user across restarts, as the real binary keeps it: without
//! `default-user-sync` the stored user wins (RabbitMQ creates the default user only on a
//! fresh node); with it (what the operator sets) a rotated password or user name in the
//! environment takes effect at the next start.

#[path = "common/node.rs"]
mod node;
use node::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_warren-broker");

struct Node {
    child: Child,
    mgmt: u16,
}

impl Node {
    async fn start(dir: &Path, user: &str, pass: &str, sync: bool) -> Node {
        let mgmt = free_port();
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["--data-dir", dir.join("data").to_str().unwrap()])
            .args(["--amqp-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--management-listen", &format!("127.0.0.1:{mgmt}")])
            .args(["--prometheus-listen", "none"])
            .env_remove("WARREN_CONFIG")
            .env_remove("WARREN_DEFAULT_USER_SYNC")
            .env("WARREN_DEFAULT_USER", user)
            .env("WARREN_DEFAULT_PASS", pass)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("node.log"))
                    .unwrap(),
            );
        if sync {
            cmd.env("WARREN_DEFAULT_USER_SYNC", "true");
        }
        let mut child = cmd.spawn().unwrap();
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", mgmt))
                .await
                .is_ok()
            {
                return Node { child, mgmt };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "node did not start: {}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        );
    }

    /// The status of `GET /api/whoami` as `user`, and its tags.
    async fn whoami(&self, user: &str, pass: &str) -> (u16, String) {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/whoami", self.mgmt))
            .basic_auth(user, Some(pass))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        (status, body["tags"].to_string())
    }

    /// Waits until `user`/`pass` is accepted (a sync runs just after the node starts).
    async fn accepts(&self, user: &str, pass: &str) -> String {
        for _ in 0..100 {
            let (status, tags) = self.whoami(user, pass).await;
            if status == 200 {
                return tags;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{user} with its password not accepted within 5 s");
    }

    /// A clean stop (SIGTERM), so the next start reads what this one stored.
    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A node still running when the test fails is killed, not left behind.
impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn a_rotated_default_user_takes_effect_at_start_only_with_default_user_sync() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("warren-default-user-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // A fresh node creates the default user; its password is then changed through the API.
    let node = Node::start(&dir, "admin", "first", false).await;
    node.accepts("admin", "first").await;
    let r = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{}/api/users/admin", node.mgmt))
        .basic_auth("admin", Some("first"))
        .json(&serde_json::json!({"password": "changed-by-api", "tags": "administrator"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    node.stop();

    // Without the sync the stored user wins, as in RabbitMQ.
    let node = Node::start(&dir, "admin", "first", false).await;
    node.accepts("admin", "changed-by-api").await;
    assert_eq!(node.whoami("admin", "first").await.0, 401);
    node.stop();

    // With it, the environment's password is set at start; the stored one stops working.
    let node = Node::start(&dir, "admin", "rotated", true).await;
    node.accepts("admin", "rotated").await;
    assert_eq!(node.whoami("admin", "changed-by-api").await.0, 401);
    node.stop();

    // A new user name is created as an administrator with the default vhost's permissions.
    let node = Node::start(&dir, "admin2", "second", true).await;
    let tags = node.accepts("admin2", "second").await;
    assert!(tags.contains("administrator"), "{tags}");
    let r = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/permissions/%2F/admin2",
            node.mgmt
        ))
        .basic_auth("admin2", Some("second"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["configure"], ".*", "{p}");
    // Restarting with the same credentials changes nothing.
    node.stop();
    let node = Node::start(&dir, "admin2", "second", true).await;
    node.accepts("admin2", "second").await;
    node.stop();
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    assert_eq!(
        log.matches("default user synced").count(),
        2,
        "one sync per change:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
