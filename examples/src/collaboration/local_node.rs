//! A node in this process, on a free loopback port with its queue in a temporary directory,
//! for a run that brings its own mesh.

use std::{net::SocketAddr, time::Duration};

use agentmesh_node::{Node, NodeConfig};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use super::Error;

/// A node serving gRPC and HTTP on `127.0.0.1` until [`LocalNode::stop`].
#[derive(Debug)]
pub struct LocalNode {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
    _data_dir: tempfile::TempDir,
}

impl LocalNode {
    /// Starts a node with the default settings on a free port.
    pub async fn start() -> Result<Self, Error> {
        let data_dir = tempfile::tempdir()?;
        let mut config = NodeConfig {
            shutdown_grace: Duration::from_secs(1),
            ..Default::default()
        };
        config.queue.data_dir = data_dir.path().to_owned();
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(Node::new(config).serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            address,
            stop,
            task,
            _data_dir: data_dir,
        })
    }

    /// `host:port` of the node.
    pub fn addr(&self) -> String {
        self.address.to_string()
    }

    /// Stops the node and waits until it has.
    pub async fn stop(self) -> Result<(), Error> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}
