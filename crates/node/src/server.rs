//! Puts the node together: every gRPC service, health and reflection, and the
//! HTTP gateway, behind the edge layer that builds each call's context, on one port.

use std::{future::Future, sync::Arc};

use agentmesh_proto::v1::{
    agent_service_server::AgentServiceServer, discovery_service_server::DiscoveryServiceServer,
    fan_out_service_server::FanOutServiceServer, trace_service_server::TraceServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::ServiceBuilder;

use agentmesh_a2a::{
    client::A2aClient,
    outbound::{A2aTransport, ExternalAgents},
};
use agentmesh_core::{
    MeshCore, Router,
    queue::{QueueHandle, Queues},
    registry::AgentRegistry,
};
use agentmesh_proto::DeadlinePolicy;

use agentmesh_core::access::Access;

/// The external A2A agents added at run time, kept in the data directory across restarts.
const A2A_AGENTS_FILE: &str = "a2a-agents.json";

use crate::{
    Stores,
    auth::AuthLayer,
    config::NodeConfig,
    edge::CallContextLayer,
    grpc::{AgentFace, Discovery, FanOutFace, OversizedRequestLayer, QueueFace, TraceFace},
    tls::ServerTls,
};

/// gRPC services the node reports in `grpc.health.v1.Health`.
const SERVICES: &[&str] = &[
    "agentmesh.v1.AgentService",
    "agentmesh.v1.DiscoveryService",
    "agentmesh.v1.FanOutService",
    "agentmesh.v1.QueueService",
];

/// A mesh node: registry, router and their gRPC/HTTP faces.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    registry: Arc<dyn AgentRegistry>,
    router: Router,
    shutdown: CancellationToken,
    queue: Option<QueueHandle>,
    roster: Option<agentmesh_redis::NodeRoster>,
    a2a_tasks: Arc<dyn agentmesh_a2a::inbound::TaskStore>,
}

impl Node {
    /// A node with the given configuration, its state in this process.
    pub fn new(config: NodeConfig) -> Self {
        let stores = Stores::in_memory(&config);
        Self::with_stores(config, stores)
    }

    /// A node over the given stores (see [`Stores::open`]).
    pub fn with_stores(config: NodeConfig, stores: Stores) -> Self {
        let access = if config.auth.enabled {
            Access::enforce(config.auth.policy.clone())
        } else {
            Access::open()
        };
        let router = Router::with_stores(
            Arc::clone(&stores.registry),
            stores.replay,
            stores.idempotency,
            config.router.clone(),
        )
        .with_journal(stores.journal)
        .with_access(Arc::new(access))
        .with_foreign_transport(Arc::new(A2aTransport::new(A2aClient::new(
            config.router.connect_timeout,
        ))));
        Self {
            config,
            registry: stores.registry,
            router,
            shutdown: CancellationToken::new(),
            queue: stores.queue,
            roster: stores.roster,
            a2a_tasks: stores.a2a_tasks,
        }
    }

    /// Serves `queue` instead of opening the embedded store in `config.queue.data_dir`
    /// when serving starts (the caller then closes it).
    pub fn with_queue(mut self, queue: QueueHandle) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The node's registry.
    pub fn registry(&self) -> &Arc<dyn AgentRegistry> {
        &self.registry
    }

    /// Serves on `listener` until `signal` completes, then drains: health
    /// turns NOT_SERVING, streams are ended, and in-flight calls get
    /// `shutdown_grace` to finish.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let auth = AuthLayer::new(&self.config.auth, &self.config.rate_limit)
            .map_err(std::io::Error::other)?;
        // Read before anything starts, so a bad certificate stops the node with its name.
        let tls = if self.config.tls.enabled() {
            let tls = ServerTls::load(&self.config.tls).map_err(std::io::Error::other)?;
            tls.watch(self.shutdown.clone())
                .map_err(std::io::Error::other)?;
            Some(tls)
        } else {
            None
        };
        let agents = &self.config.tls.agents;
        if !agents.ca.is_empty() || !agents.cert.is_empty() {
            let client = agents.client_config().map_err(std::io::Error::other)?;
            self.router = self.router.with_agent_tls(client);
        }
        // https:// A2A agents (cards, calls) and webhooks trust the same roots.
        let http_tls = agents.http_tls().map_err(std::io::Error::other)?;
        let a2a_client = A2aClient::with_tls(self.config.router.connect_timeout, &http_tls)
            .map_err(|e| std::io::Error::other(format!("tls.agents: {e}")))?;
        self.router = self
            .router
            .with_foreign_transport(Arc::new(A2aTransport::new(a2a_client.clone())));
        let (queue, own_queue) = match self.queue.clone() {
            Some(queue) => (queue, false),
            None => {
                let queue = QueueHandle::open(&self.config.queue)
                    .await
                    .map_err(std::io::Error::other)?;
                (queue, true)
            }
        };
        let queues = Queues::new(
            queue.backend().clone(),
            self.config.queue.keep_alive,
            self.shutdown.clone(),
        )
        .with_journal(Arc::clone(self.router.journal()))
        .with_access(Arc::clone(self.router.access()));
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // External A2A agents: those of the configuration and those added earlier.
        let a2a_agents = ExternalAgents::new(
            Arc::clone(&self.registry),
            a2a_client,
            self.config.a2a.external(),
            Some(self.config.queue.data_dir.join(A2A_AGENTS_FILE)),
        );
        let mesh = Arc::new(
            MeshCore::new(
                self.router.clone(),
                Arc::clone(&self.registry),
                ready.clone(),
            )
            .with_a2a_agents(a2a_agents.clone()),
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        Arc::clone(&self.registry).start();
        self.router.spawn_channel_pruner();
        a2a_agents.start(self.shutdown.clone());

        let max = self.config.max_message_bytes;
        let reflection = reflection_builder()
            .build_v1()
            .map_err(std::io::Error::other)?;
        let reflection_alpha = reflection_builder()
            .build_v1alpha()
            .map_err(std::io::Error::other)?;
        let mut routes = Routes::builder();
        routes
            .add_service(
                AgentServiceServer::new(AgentFace::new(Arc::clone(&mesh)))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                DiscoveryServiceServer::new(Discovery::new(
                    Arc::clone(&self.registry),
                    Arc::clone(&mesh),
                    self.shutdown.clone(),
                ))
                .max_decoding_message_size(max),
            )
            .add_service(
                FanOutServiceServer::new(FanOutFace::new(Arc::clone(&mesh)))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(TraceServiceServer::new(TraceFace::new(Arc::clone(&mesh))))
            .add_service(
                agentmesh_proto::v1::queue_service_server::QueueServiceServer::new(QueueFace::new(
                    queues.clone(),
                ))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            )
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha);
        let a2a = self.config.a2a.enabled.then(|| {
            let a2a = Arc::new(
                agentmesh_a2a::A2aInbound::new(
                    Arc::clone(&mesh) as Arc<dyn agentmesh_core::Mesh>,
                    Arc::clone(&self.registry),
                    queue.backend().clone(),
                    Arc::clone(&self.a2a_tasks),
                    self.config.a2a.clone(),
                )
                .with_access(Arc::clone(self.router.access()))
                .with_http_tls(http_tls.clone()),
            );
            a2a.spawn_worker(self.shutdown.clone());
            a2a.spawn_push_worker(self.shutdown.clone());
            agentmesh_a2a::inbound::router(a2a)
        });
        let gateway = agentmesh_gateway::router_with_queues(
            mesh,
            Arc::new(queues),
            self.config.gateway.clone(),
        );
        let gateway = gateway.merge(crate::metrics::routes(
            Arc::clone(&self.registry),
            self.router.clone(),
            queue.clone(),
            auth.stats(),
            tls.clone(),
        ));
        let gateway = match a2a {
            Some(a2a) => gateway.merge(a2a),
            None => gateway,
        };
        let app = routes
            .routes()
            .into_axum_router()
            .layer(OversizedRequestLayer)
            .merge(gateway)
            .layer(
                // The context first, then who is calling: authentication and rate limits
                // see the correlation id and store the principal in the context.
                ServiceBuilder::new()
                    .layer(CallContextLayer::new(DeadlinePolicy {
                        default_timeout: self.config.router.default_timeout,
                        max_timeout: self.config.max_timeout,
                    }))
                    .layer(auth),
            );

        let address = listener.local_addr()?;
        if let Some(roster) = &self.roster {
            // Other nodes forward resumes of this node's streams here.
            let advertised = match self.config.store.advertise.as_str() {
                "" if tls.is_some() => format!("https://{address}"),
                "" => format!("http://{address}"),
                set => set.to_owned(),
            };
            roster
                .announce(&advertised)
                .await
                .map_err(std::io::Error::other)?;
        }
        set_health(&health, ServingStatus::Serving).await;
        ready.store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(%address, tls = tls.is_some(), "agentmesh node serving gRPC and HTTP");

        let shutdown = self.shutdown.clone();
        let grace = self.config.shutdown_grace;
        let draining = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            async move {
                signal.await;
                ready.store(false, std::sync::atomic::Ordering::Release);
                tracing::info!("shutting down: draining in-flight calls");
                set_health(&health, ServingStatus::NotServing).await;
                shutdown.cancel();
            }
        };
        let server =
            crate::connections::serve(listener, app, &self.config.connections, tls, draining);
        let result = tokio::select! {
            () = server => Ok(()),
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "calls still open after the grace period; closing them");
                Ok(())
            }
        };
        if own_queue {
            queue.close().await;
        }
        if let Some(roster) = &self.roster {
            if let Err(error) = roster.withdraw().await {
                tracing::warn!(%error, "could not take this node off the mesh's list");
            }
        }
        result
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(agentmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in SERVICES {
        health.set_service_status(*service, status).await;
    }
}
