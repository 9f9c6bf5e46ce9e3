//! A real `agentmesh serve` process, for the tests of the binary itself (a crash, a full
//! disk, several nodes on one Redis): started on a free port, waited for until it answers,
//! killed on drop.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentmesh_sdk::MeshClient;

/// A free TCP port on loopback (free when asked; bind it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node process; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct NodeProcess {
    /// The process (for kill -9 tests and `/proc/<pid>`).
    pub child: Child,
    /// Where it listens, `127.0.0.1:PORT`.
    pub address: String,
}

impl NodeProcess {
    /// Runs `bin serve` on a free port over `data_dir`, with `extra` arguments, and waits
    /// until it answers.
    pub async fn start(bin: &str, data_dir: &Path, extra: &[String]) -> Self {
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin)
            .args(["serve", "--listen", &address, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("AGENTMESH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self::adopt(child, address).await
    }

    /// Takes on a node started some other way (e.g. inside a namespace) that will listen on
    /// `address`, and waits until it answers.
    pub async fn adopt(child: Child, address: String) -> Self {
        let node = Self { child, address };
        let client = node.client();
        let until = Instant::now() + Duration::from_secs(20);
        // A node with authentication on answers UNAUTHENTICATED: it is up.
        while client
            .list_queues()
            .await
            .is_err_and(|status| status.code() != tonic::Code::Unauthenticated)
        {
            assert!(
                Instant::now() < until,
                "node at {} did not come up",
                node.address
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    /// A client of this node.
    pub fn client(&self) -> MeshClient {
        MeshClient::connect_lazy(&self.address).unwrap()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
