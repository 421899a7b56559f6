#![allow(clippy::unwrap_used, dead_code)]
//! A real `warren-broker` process on free ports with its own data directory: for tests that
//! restart, kill or signal the node, or measure its memory. Included by test files with
//! `#[path = "common/node.rs"] mod node;`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

#[path = "ports.rs"]
mod ports;

pub struct Node {
    pub child: Child,
    pub port: u16,
    pub mgmt: u16,
    pub log: PathBuf,
}

pub use ports::free_port;

/// A fresh data directory for test `name` (removed if a previous run left it).
pub fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("warren-dur-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl Node {
    pub async fn start(dir: &Path) -> Node {
        Self::start_with(dir, &[]).await
    }

    /// Starts a node on `dir` with extra flags; returns once it accepts AMQP connections.
    pub async fn start_with(dir: &Path, args: &[&str]) -> Node {
        let port = free_port();
        let mgmt = free_port();
        let log = dir.with_extension(format!("{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
            .args(["--data-dir", dir.to_str().unwrap()])
            .args(["--amqp-listen", &format!("127.0.0.1:{port}")])
            .args(["--management-listen", &format!("127.0.0.1:{mgmt}")])
            .args(["--prometheus-listen", &format!("127.0.0.1:{}", free_port())])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let node = Node {
            child,
            port,
            mgmt,
            log,
        };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("broker did not start; log:\n{}", node.log_text());
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn crash(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log_text()
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the process to exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -TERM failed");
        let status = self.child.wait().unwrap();
        (status, self.log_text())
    }
}
