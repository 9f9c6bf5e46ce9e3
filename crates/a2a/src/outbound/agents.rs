//! External A2A agents on the mesh: added by card URL (configuration, `AddA2aAgent`), listed
//! in the registry with their skills, their cards refreshed and their leases renewed by one
//! timer that sleeps until the next thing is due.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Weak},
    time::Duration,
};

use agentmesh_core::{MeshError, api::A2aAgents, registry::AgentRegistry};
use agentmesh_proto::v1::{
    AddA2aAgentRequest, AddA2aAgentResponse, AgentCard as MeshCard, InteractionStyle, Skill,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::transport::{BINDING_KEY, CARD_URL_KEY, TENANT_KEY};
use crate::{
    client::{A2aClient, ClientError, card_url, pick_interface},
    types::AgentCard,
};

/// Settings of external A2A agents (the `[a2a]` section's `agents`, `card_refresh`,
/// `card_timeout`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExternalAgentsConfig {
    /// External A2A agents to list on the mesh from the start.
    pub agents: Vec<ExternalAgent>,
    /// How often each external agent's card is fetched again.
    #[serde(with = "humantime_serde")]
    pub card_refresh: Duration,
    /// How long fetching a card may take.
    #[serde(with = "humantime_serde")]
    pub card_timeout: Duration,
}

impl Default for ExternalAgentsConfig {
    fn default() -> Self {
        Self {
            agents: Vec::new(),
            card_refresh: Duration::from_secs(300),
            card_timeout: Duration::from_secs(10),
        }
    }
}

/// One external A2A agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalAgent {
    /// Its base URL (the card is at `/.well-known/agent-card.json` below it) or its card's URL.
    pub url: String,
    /// The name it is addressed by on the mesh; empty: derived from the card's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// The lease TTL asked for (the registry clamps it to its bounds); renewed at a third.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// The first retry of a card that could not be fetched; doubles up to `card_refresh`.
const FIRST_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Entry {
    agent: ExternalAgent,
    /// The mesh card last registered, and its lease.
    listed: Option<(MeshCard, String)>,
    next_refresh: Instant,
    next_renewal: Option<Instant>,
    /// A third of the lease's TTL.
    renew_every: Duration,
    /// Consecutive failed fetches.
    failures: u32,
}

/// The external A2A agents this node lists on the mesh.
#[derive(Debug)]
pub struct ExternalAgents {
    registry: Arc<dyn AgentRegistry>,
    client: A2aClient,
    config: ExternalAgentsConfig,
    /// Where agents added at run time are kept across restarts.
    saved: Option<PathBuf>,
    /// By card URL and the name asked for.
    entries: Mutex<BTreeMap<String, Entry>>,
    wake: Arc<Notify>,
}

impl ExternalAgents {
    /// The agents of `config`, and those saved in `saved` by earlier runs, to be listed in
    /// `registry` once [`ExternalAgents::start`] runs.
    pub fn new(
        registry: Arc<dyn AgentRegistry>,
        client: A2aClient,
        config: ExternalAgentsConfig,
        saved: Option<PathBuf>,
    ) -> Arc<Self> {
        let mut agents = config.agents.clone();
        if let Some(path) = &saved {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Vec<ExternalAgent>>(&bytes) {
                    Ok(kept) => agents.extend(kept),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable list of added A2A agents")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the list of added A2A agents")
                }
            }
        }
        let now = Instant::now();
        let entries = agents
            .into_iter()
            .map(|agent| {
                let key = entry_key(&agent);
                let entry = Entry {
                    agent,
                    listed: None,
                    next_refresh: now,
                    next_renewal: None,
                    renew_every: LEASE_TTL / 3,
                    failures: 0,
                };
                (key, entry)
            })
            .collect();
        Arc::new(Self {
            registry,
            client,
            config,
            saved,
            entries: Mutex::new(entries),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Lists the agents and keeps them listed until `shutdown`: one task that wakes when a
    /// card refresh or a lease renewal falls due (or an agent is added), never sooner.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let this: Weak<Self> = Arc::downgrade(self);
        let wake = Arc::clone(&self.wake);
        tokio::spawn(async move {
            loop {
                // Taken before the work, so an agent added meanwhile is not missed.
                let woken = wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let next = {
                    let Some(agents) = this.upgrade() else { return };
                    agents.run_due().await;
                    agents.next_due()
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = woken => {}
                    _ = async {
                        match next {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        });
    }

    /// Fetches the card of `agent`, lists it, and keeps it listed; saved for restarts
    /// when `save` (the agents of the configuration are not).
    pub async fn add_agent(&self, agent: ExternalAgent, save: bool) -> Result<MeshCard, Status> {
        let key = entry_key(&agent);
        let card = self
            .fetch(&agent)
            .await
            .map_err(|e| Status::from(e.into_mesh_error(&card_url(&agent.url))))?;
        let lease = self.list(&card).await?;
        let renew_every = renewal_of(&lease);
        {
            let mut entries = self.entries.lock();
            entries.insert(
                key.clone(),
                Entry {
                    agent: agent.clone(),
                    listed: Some((card.clone(), lease.lease_id)),
                    next_refresh: Instant::now() + self.config.card_refresh,
                    next_renewal: Some(Instant::now() + renew_every),
                    renew_every,
                    failures: 0,
                },
            );
        }
        if save {
            self.save(agent).await;
        }
        self.wake.notify_one();
        tracing::info!(agent = %card.name, card = %key, endpoint = %card.endpoint, "external A2A agent listed");
        Ok(card)
    }

    async fn save(&self, agent: ExternalAgent) {
        let Some(path) = self.saved.clone() else {
            return;
        };
        let mut kept: Vec<ExternalAgent> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        kept.retain(|k| entry_key(k) != entry_key(&agent));
        kept.push(agent);
        let written = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let temporary = path.with_extension("json.tmp");
            std::fs::write(&temporary, serde_json::to_vec_pretty(&kept)?)?;
            std::fs::rename(&temporary, &path)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(
                ?written,
                "cannot save the list of added A2A agents; they will not survive a restart"
            );
        }
    }

    async fn fetch(&self, agent: &ExternalAgent) -> Result<MeshCard, FetchError> {
        let card_url = card_url(&agent.url);
        let card = self
            .client
            .fetch_card(&card_url, self.config.card_timeout)
            .await
            .map_err(FetchError::Client)?;
        mesh_card(&card, &card_url, &agent.name).map_err(FetchError::Card)
    }

    async fn list(&self, card: &MeshCard) -> Result<agentmesh_proto::v1::Lease, Status> {
        let (lease, _) = self
            .registry
            .register(card.clone(), Some(LEASE_TTL))
            .await?;
        Ok(lease)
    }

    fn next_due(&self) -> Option<Instant> {
        self.entries
            .lock()
            .values()
            .flat_map(|e| [Some(e.next_refresh), e.next_renewal])
            .flatten()
            .min()
    }

    /// Refreshes the cards and renews the leases that are due.
    async fn run_due(&self) {
        let now = Instant::now();
        let due: Vec<Due> = self
            .entries
            .lock()
            .iter()
            .filter_map(|(key, e)| {
                let refresh = e.next_refresh <= now;
                let renew = e.next_renewal.is_some_and(|at| at <= now);
                (refresh || renew).then(|| Due {
                    key: key.clone(),
                    agent: e.agent.clone(),
                    listed: e.listed.clone(),
                    refresh,
                    renew,
                })
            })
            .collect();
        // Each on its own: a slow card fetch does not hold up the others' renewals.
        futures::future::join_all(due.into_iter().map(|due| self.run_one(due))).await;
    }

    /// Refreshes one agent's card and renews its lease, whichever is due.
    async fn run_one(&self, due: Due) {
        let Due {
            key,
            agent,
            listed,
            refresh,
            renew,
        } = due;
        let mut card = listed.as_ref().map(|(card, _)| card.clone());
        let mut lease_id = listed.map(|(_, lease)| lease);
        let mut fetched = None;
        if refresh {
            match self.fetch(&agent).await {
                Ok(fresh) => fetched = Some(fresh),
                Err(error) => {
                    tracing::warn!(card = %key, %error, "cannot refresh an external A2A agent's card; keeping the last one")
                }
            }
        }
        // List anew when the card changed or the lease is gone.
        let mut relist = false;
        if let Some(fresh) = fetched.clone()
            && card.as_ref() != Some(&fresh)
        {
            card = Some(fresh);
            relist = true;
        }
        if !relist
            && renew
            && let Some(lease) = &lease_id
        {
            match self.registry.heartbeat(lease).await {
                Ok(_) => {}
                Err(MeshError::LeaseNotFound(_)) => relist = true,
                Err(error) => {
                    tracing::warn!(card = %key, %error, "cannot renew an external A2A agent's lease")
                }
            }
        }
        let mut relisted_every = None;
        if relist && let Some(card) = &card {
            match self.list(card).await {
                Ok(lease) => {
                    relisted_every = Some(renewal_of(&lease));
                    lease_id = Some(lease.lease_id);
                }
                Err(error) => {
                    tracing::warn!(card = %key, %error, "cannot list an external A2A agent")
                }
            }
        }
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(&key) else {
            return;
        };
        if refresh {
            if fetched.is_some() {
                entry.failures = 0;
                entry.next_refresh = Instant::now() + self.config.card_refresh;
            } else {
                entry.failures += 1;
                let retry = FIRST_RETRY
                    .saturating_mul(1 << entry.failures.min(16))
                    .min(self.config.card_refresh);
                // Listed agents keep their card until the next regular refresh.
                let wait = if entry.listed.is_some() {
                    self.config.card_refresh
                } else {
                    retry
                };
                entry.next_refresh = Instant::now() + wait;
            }
        }
        if let (Some(card), Some(lease)) = (card, lease_id) {
            entry.listed = Some((card, lease));
        }
        if let Some(every) = relisted_every {
            entry.renew_every = every;
            entry.next_renewal = Some(Instant::now() + every);
        } else if renew {
            entry.next_renewal = Some(Instant::now() + entry.renew_every);
        }
    }
}

/// An agent whose card refresh or lease renewal is due.
struct Due {
    key: String,
    agent: ExternalAgent,
    listed: Option<(MeshCard, String)>,
    refresh: bool,
    renew: bool,
}

/// How often a lease is renewed: at a third of its TTL.
fn renewal_of(lease: &agentmesh_proto::v1::Lease) -> Duration {
    let ttl = lease
        .ttl
        .and_then(|t| Duration::try_from(t).ok())
        .unwrap_or(LEASE_TTL);
    ttl / 3
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("{0}")]
    Client(ClientError),
    #[error("{0}")]
    Card(String),
}

impl FetchError {
    fn into_mesh_error(self, card_url: &str) -> MeshError {
        match self {
            FetchError::Client(ClientError::Unreachable(why)) => MeshError::Unavailable(format!(
                "cannot fetch the A2A agent card at {card_url}: {why}"
            )),
            FetchError::Client(ClientError::TimedOut(after)) => {
                MeshError::DeadlineExceeded(format!(
                    "cannot fetch the A2A agent card at {card_url}: no answer within {} ms",
                    after.as_millis()
                ))
            }
            FetchError::Client(error) => MeshError::FailedPrecondition(format!(
                "cannot use the A2A agent card at {card_url}: {error}"
            )),
            FetchError::Card(why) => MeshError::FailedPrecondition(format!(
                "cannot use the A2A agent card at {card_url}: {why}"
            )),
        }
    }
}

#[tonic::async_trait]
impl A2aAgents for ExternalAgents {
    async fn add(&self, request: AddA2aAgentRequest) -> Result<AddA2aAgentResponse, Status> {
        let url = request.url.trim();
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => {
                return Err(MeshError::InvalidArgument(format!(
                    "url {url:?} is not an absolute http(s) URL of an A2A agent or its card"
                ))
                .into());
            }
        }
        if !request.name.is_empty() {
            agentmesh_proto::names::check_name("name", &request.name)
                .map_err(MeshError::InvalidArgument)?;
        }
        let card = self
            .add_agent(
                ExternalAgent {
                    url: url.to_owned(),
                    name: request.name,
                },
                true,
            )
            .await?;
        Ok(AddA2aAgentResponse { card: Some(card) })
    }
}

/// The mesh card of an A2A agent: its name (or `name`), skills and version, the interface
/// the node calls as its endpoint, and where its card came from in the metadata.
pub fn mesh_card(card: &AgentCard, card_url: &str, name: &str) -> Result<MeshCard, String> {
    let interface = pick_interface(card, card_url)?;
    let name_given = name;
    let name = if name.is_empty() {
        mesh_name(&card.name)
    } else {
        name.to_owned()
    };
    agentmesh_proto::names::check_name("agent name", &name)?;
    let mut styles = vec![InteractionStyle::Unary as i32];
    if card.capabilities.streaming == Some(true) {
        styles.push(InteractionStyle::Stream as i32);
    }
    let mut metadata = std::collections::HashMap::from([
        (
            BINDING_KEY.to_owned(),
            interface.binding.as_str().to_owned(),
        ),
        (CARD_URL_KEY.to_owned(), card_url.to_owned()),
    ]);
    if let Some(tenant) = interface.tenant {
        metadata.insert(TENANT_KEY.to_owned(), tenant);
    }
    Ok(MeshCard {
        name,
        version: card.version.clone(),
        description: card.description.clone(),
        instance_id: instance_id(card_url, name_given),
        endpoint: interface.url,
        skills: card
            .skills
            .iter()
            .map(|skill| Skill {
                id: mesh_name(&skill.id),
                description: if skill.description.is_empty() {
                    skill.name.clone()
                } else {
                    skill.description.clone()
                },
                tags: skill.tags.clone(),
                ..Default::default()
            })
            .collect(),
        styles,
        metadata,
    })
}

/// A name by the mesh's rule (A-Z a-z 0-9 . _ -, not starting with '.'): other characters
/// become '-'.
fn mesh_name(name: &str) -> String {
    let mut mapped: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(agentmesh_proto::names::MAX_NAME_CHARS)
        .collect();
    if mapped.starts_with('.') {
        mapped.replace_range(..1, "-");
    }
    if mapped.is_empty() {
        mapped = "a2a-agent".to_owned();
    }
    mapped
}

/// One agent added under one name: the same card URL may be added under several names.
fn entry_key(agent: &ExternalAgent) -> String {
    format!("{}\n{}", card_url(&agent.url), agent.name)
}

/// The same instance id for the same card URL and name, on every node and across restarts
/// (FNV-1a).
fn instance_id(card_url: &str, name: &str) -> String {
    let hash = card_url
        .bytes()
        .chain([b'\n'])
        .chain(name.bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("a2a-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AgentCapabilities, AgentInterface, AgentSkill};

    #[test]
    fn an_a2a_card_becomes_a_mesh_card() {
        let card = AgentCard {
            name: "Echo Agent".into(),
            version: "1.0.0".into(),
            supported_interfaces: vec![AgentInterface {
                url: "http://127.0.0.1:9/".into(),
                protocol_binding: "JSONRPC".into(),
                ..Default::default()
            }],
            capabilities: AgentCapabilities {
                streaming: Some(true),
                ..Default::default()
            },
            skills: vec![AgentSkill {
                id: "echo back".into(),
                name: "Echo".into(),
                tags: vec!["test".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let url = "http://127.0.0.1:9/.well-known/agent-card.json";
        let mesh = mesh_card(&card, url, "").unwrap();
        assert_eq!(mesh.name, "Echo-Agent");
        assert_eq!(mesh.skills[0].id, "echo-back");
        assert_eq!(mesh.metadata[BINDING_KEY], "JSONRPC");
        assert_eq!(mesh.styles.len(), 2);
        assert_eq!(
            mesh.instance_id,
            mesh_card(&card, url, "").unwrap().instance_id
        );
        assert_ne!(
            mesh.instance_id,
            mesh_card(&card, url, "x").unwrap().instance_id
        );
        assert_eq!(mesh_card(&card, url, "echo").unwrap().name, "echo");
    }
}
