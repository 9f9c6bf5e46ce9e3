//! The processes the unary and streaming sections share: nodes, one agent registered with
//! all of them, and the bare proxy in front of that agent.

use std::time::Duration;

use agentmesh_proto::v1::{InvokeRequest, agent_service_client::AgentServiceClient};
use tonic::transport::Endpoint;

use crate::{
    harness::{Pinning, Process, start_child, start_node, wait_until},
    unary,
};

/// A node and the address it serves on.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) process: Process,
    pub(crate) address: String,
}

#[derive(Debug)]
pub(crate) struct Topology {
    /// A node with its defaults (the trace journal on).
    pub(crate) node: Node,
    /// A node with `trace.journal = false`.
    pub(crate) quiet: Node,
    /// With `AGENTMESH_TEST_REDIS`: a node whose registry is in Redis, its journal off.
    pub(crate) shared: Option<Node>,
    pub(crate) agent: Process,
    pub(crate) agent_address: String,
    pub(crate) proxy: Process,
    pub(crate) proxy_address: String,
    /// The Redis URL and key prefix of the shared node, for cleaning up.
    redis: Option<(String, String)>,
    _data: tempfile::TempDir,
}

impl Topology {
    pub(crate) async fn start(pinning: Pinning) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let node = |name, dir: &str, extra: &[&str]| {
            let (process, address) = start_node(pinning, name, &data.path().join(dir), extra);
            Node { process, address }
        };
        let default = node("node", "on", &[]);
        let quiet = node(
            "node (journal off)",
            "off",
            &["--set", "trace.journal=false"],
        );
        // One more node keeps its registry in Redis (cached locally, fed by the change
        // channel): routing should cost what it costs with the in-memory registry.
        let redis_url = std::env::var("AGENTMESH_TEST_REDIS").ok();
        let prefix = format!("bench-mesh-{}", std::process::id());
        let shared = redis_url.as_ref().map(|url| {
            let prefix_setting = format!("store.key_prefix={prefix}");
            node(
                "node (registry on Redis)",
                "redis",
                &[
                    "--store",
                    url,
                    "--set",
                    &prefix_setting,
                    "--set",
                    "trace.journal=false",
                ],
            )
        });
        let mut agent_args = vec!["agent", default.address.as_str(), quiet.address.as_str()];
        if let Some(shared) = &shared {
            agent_args.push(shared.address.as_str());
        }
        let (agent, agent_address) = start_child(pinning, "agent", &agent_args);
        let (proxy, proxy_address) = start_child(pinning, "proxy", &["proxy", &agent_address]);
        let topology = Self {
            node: default,
            quiet,
            shared,
            agent,
            agent_address,
            proxy,
            proxy_address,
            redis: redis_url.map(|url| (url, prefix)),
            _data: data,
        };
        let mut ready = vec![
            &topology.node.address,
            &topology.quiet.address,
            &topology.proxy_address,
        ];
        if let Some(shared) = &topology.shared {
            ready.push(&shared.address);
        }
        for address in ready {
            routes(address).await;
        }
        topology
    }

    /// Stops every process and deletes the shared node's keys.
    pub(crate) async fn stop(self) {
        let redis = self.redis.clone();
        drop(self);
        if let Some((url, prefix)) = redis {
            crate::queue::delete_keys(&url, &prefix).await;
        }
    }
}

/// Waits until a call through `address` reaches the agent (the node serving, the agent
/// registered).
async fn routes(address: &str) {
    let request: InvokeRequest = unary::request();
    wait_until(
        &format!("{address} routes to the agent"),
        Duration::from_secs(20),
        || {
            let request = request.clone();
            async move {
                let Ok(channel) = Endpoint::from_shared(format!("http://{address}"))
                    .unwrap()
                    .connect()
                    .await
                else {
                    return false;
                };
                AgentServiceClient::new(channel)
                    .invoke(request)
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}
