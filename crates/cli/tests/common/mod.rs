//! Shared fixtures: a real node on an ephemeral port, and small agents.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, time::Duration};

use agentmesh_node::{Node, NodeConfig};
use agentmesh_proto::v1::{AgentCard, Envelope, Skill};
use agentmesh_sdk::{Agent, AgentRuntime, Context, MeshClient, RunningAgent};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::Status;

/// A node serving on a real socket.
pub struct TestNode {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// The queue store's directory: a fresh temp dir (removed with the node) unless the
    /// config named one.
    pub data_dir: std::path::PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl TestNode {
    pub async fn start() -> Self {
        Self::start_with(test_config(), "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a node with `config`. Unless `config.queue.data_dir` was changed from the
    /// default, the node's queue lives in a temp dir of its own.
    pub async fn start_with(mut config: NodeConfig, address: SocketAddr) -> Self {
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

    pub fn client(&self) -> MeshClient {
        MeshClient::connect_lazy(&self.addr()).unwrap()
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

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

pub fn test_config() -> NodeConfig {
    NodeConfig {
        shutdown_grace: Duration::from_secs(1),
        ..Default::default()
    }
}

/// A card with one skill named like the agent.
pub fn card(name: &str) -> AgentCard {
    AgentCard {
        name: name.into(),
        version: "1.0.0".into(),
        skills: vec![Skill {
            id: format!("{name}-skill"),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Replies with the request's payload.
pub struct Echo;

#[tonic::async_trait]
impl Agent for Echo {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(Envelope {
            r#type: "echo.reply".into(),
            payload: request.payload,
            ..Default::default()
        })
    }
}

/// Starts `agent` against `node` and waits for its first registration.
pub async fn start_agent<A: Agent>(node: &TestNode, card: AgentCard, agent: A) -> RunningAgent {
    start_agent_with_ttl(node, card, agent, Duration::from_secs(10)).await
}

pub async fn start_agent_with_ttl<A: Agent>(
    node: &TestNode,
    card: AgentCard,
    agent: A,
    ttl: Duration,
) -> RunningAgent {
    let running = AgentRuntime::new(card, agent)
        .node(node.addr())
        .ttl(ttl)
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.registered(1))
        .await
        .expect("agent registers within 5 s");
    running
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
