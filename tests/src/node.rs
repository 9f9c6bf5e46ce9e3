//! A node serving on a real socket, as a test starts and stops it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use agentmesh_gateway::GatewayConfig;
use agentmesh_node::{Node, NodeConfig};
use agentmesh_sdk::MeshClient;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// A node serving gRPC and HTTP on a real socket until [`TestNode::stop`].
#[derive(Debug)]
pub struct TestNode {
    /// Where the node listens.
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// The queue store's directory: a fresh temp dir (removed with the node) unless the
    /// config named one.
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl TestNode {
    /// A node with [`test_config`] on an ephemeral port.
    pub async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    /// A node with `config` on an ephemeral port.
    pub async fn start_with(config: NodeConfig) -> Self {
        Self::start_at(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A node with [`test_config`] whose HTTP gateway is set up as `gateway`.
    pub async fn start_with_gateway(gateway: GatewayConfig) -> Self {
        Self::start_with(NodeConfig {
            gateway,
            ..test_config()
        })
        .await
    }

    /// A node with `config` on `address`; binding is retried for a while, so a node can be
    /// restarted on the address of one that just stopped. Unless `config.queue.data_dir`
    /// was changed from the default, the node's queue lives in a temp dir of its own.
    pub async fn start_at(mut config: NodeConfig, address: SocketAddr) -> Self {
        let default_dir = std::path::Path::new(agentmesh_node::DEFAULT_DATA_DIR);
        let temp = if config.queue.data_dir == default_dir {
            let temp = tempfile::tempdir().expect("temp dir for the queue store");
            config.queue.data_dir = temp.path().to_owned();
            Some(temp)
        } else {
            None
        };
        let data_dir = config.queue.data_dir.clone();
        let listener = bind_retrying(address).await;
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(Node::new(config).serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            address,
            stop: Some(stop),
            task,
            data_dir,
            _temp: temp,
        }
    }

    /// `host:port` of the node.
    pub fn addr(&self) -> String {
        self.address.to_string()
    }

    /// `http://host:port`, the base of the gateway's routes.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// An SDK client of the node (connects on first use).
    pub fn client(&self) -> MeshClient {
        MeshClient::connect_lazy(&self.addr()).unwrap()
    }

    /// An SDK client without breakers of its own, so that a test sees the node's.
    pub fn client_without_breakers(&self) -> MeshClient {
        self.client().with_breakers(None)
    }

    /// A connected gRPC channel to the node, for the generated clients.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.http_url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Signals shutdown and waits for the node to stop cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("node stops within its grace period")
            .unwrap()
            .unwrap();
    }
}

async fn bind_retrying(address: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        match TcpListener::bind(address).await {
            Ok(listener) => return listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot bind {address}");
}

/// The defaults, with a short shutdown grace so tests stop quickly.
pub fn test_config() -> NodeConfig {
    NodeConfig {
        shutdown_grace: Duration::from_secs(1),
        ..Default::default()
    }
}
