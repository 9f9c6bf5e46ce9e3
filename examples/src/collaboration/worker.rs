//! A worker: an agent with the `summarize` skill. It accepts parts of a plan (invoke, the
//! target of the coordinator's fan-out), works on a part while streaming progress back
//! (stream), answers a peer's consultation (converse), and finishes parts that are put on
//! the `collaboration.finish` queue (a queue worker), whose results go to their `reply_to`.
//!
//! Each worker runs on a tokio runtime and thread of its own, as if it were a process of its
//! own: [`LocalWorker::kill`] drops that runtime at once, so its connections close mid-call,
//! it never deregisters and its lease lapses, as when a process dies.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use agentmesh_sdk::{
    Agent, AgentRuntime, Context, Conversation, MeshClient, StreamSink, Worker,
    proto::v1::{AgentCard, Envelope, Skill},
};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tonic::Status;

use super::{
    Error,
    chain::Chain,
    document::{
        Keyword, describe, keep_after_consulting, keywords, keywords_from_json, keywords_json,
        words,
    },
};

/// The skill every worker offers, and the coordinator looks up.
pub const SKILL: &str = "summarize";

/// The queue a worker puts a finished part on; any worker's queue consumer finishes it.
pub const FINISH_QUEUE: &str = "collaboration.finish";

/// How long each step of the work on a part takes, so progress is visible as it happens.
const WORK_STEP: Duration = Duration::from_millis(200);

/// Steps of the work on a part, as the progress reports count them.
const STEPS: u32 = 4;

/// A worker's lease: short, so a killed worker leaves the registry soon.
const LEASE: Duration = Duration::from_secs(3);

/// How long a consulted worker waits for its own keywords, and a consulting one for the answer.
const CONSULT_WAIT: Duration = Duration::from_secs(5);

/// The `summarize` agent.
struct Summarizer {
    name: String,
    chain: Chain,
    /// Each part's keywords once counted, by correlation id: what a consulting peer asks for.
    keywords: watch::Sender<HashMap<String, Vec<Keyword>>>,
}

#[tonic::async_trait]
impl Agent for Summarizer {
    /// The assignment (step 3): the plan names a worker for each part; this one accepts its own.
    async fn invoke(&self, ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        let plan = request.json_payload().unwrap_or_default();
        let mine: Vec<String> = plan["plan"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["worker"] == self.name.as_str())
            .map(|p| {
                format!(
                    "part {} \"{}\"",
                    p["part"],
                    p["title"].as_str().unwrap_or("")
                )
            })
            .collect();
        self.chain.record(
            3,
            ("coordinator", &self.name),
            "fan-out (best effort)",
            ctx.correlation_id(),
            format!("assigned {}", mine.join(", ")),
        );
        Ok(Envelope::json(
            "summary.accepted",
            json!({ "worker": self.name, "accepted": mine.len() }),
        ))
    }

    /// The work on one part: progress reports (step 5) as partial results, a consultation
    /// with the worker of the next part if the coordinator named one (steps 6–7), then the
    /// part goes on the finish queue with the coordinator's `reply_to` (step 8).
    async fn stream(
        &self,
        ctx: Context,
        request: Envelope,
        events: StreamSink,
    ) -> Result<Envelope, Status> {
        let task = request.json_payload().unwrap_or_default();
        let part = task["part"].as_u64().unwrap_or_default();
        let text = task["text"].as_str().unwrap_or_default();
        let reply_to = task["reply_to"].as_str().unwrap_or_default();
        let report = |step: u32, note: String| {
            let mut progress = Envelope::json(
                "summary.progress",
                json!({ "part": part, "step": step, "of": STEPS, "note": note }),
            );
            progress.answer_to(&request, &self.name);
            events.partial(progress)
        };

        let word_count = words(text).count();
        report(1, format!("read {word_count} words")).await?;
        tokio::time::sleep(WORK_STEP).await;

        let mut found = keywords(text);
        self.keywords.send_modify(|by_chain| {
            by_chain.insert(ctx.correlation_id().to_owned(), found.clone());
        });
        report(2, format!("keywords {}", describe(&found))).await?;
        tokio::time::sleep(WORK_STEP).await;

        let note = match task["consult"].as_str().filter(|peer| !peer.is_empty()) {
            Some(peer) => match self.consult(&ctx, peer, part, &found).await {
                Ok((kept, given_up)) if given_up.is_empty() => {
                    found = kept;
                    format!("agreed with {peer}: no keyword in common")
                }
                Ok((kept, given_up)) => {
                    found = kept;
                    format!("agreed with {peer}: {} goes to {peer}", given_up.join(", "))
                }
                Err(status) => format!(
                    "could not consult {peer} ({}); keeping every keyword",
                    status.message()
                ),
            },
            None => "no neighbour to consult".to_owned(),
        };
        report(3, note).await?;
        tokio::time::sleep(WORK_STEP).await;

        let client = ctx
            .client()
            .ok_or_else(|| Status::failed_precondition("the worker has no node to submit to"))?;
        let mut finished = Envelope::json(
            "summary.finish",
            json!({
                "part": part,
                "title": task["title"],
                "worker": self.name,
                "words": word_count,
                "keywords": keywords_json(&found),
            }),
        );
        // The finisher's result goes to the coordinator's queue; the correlation id and
        // causation are inherited from the call being handled.
        finished.reply_to = reply_to.to_owned();
        // Recorded before the submit: the finished part may come back before it returns.
        self.chain.record(
            8,
            (&self.name, FINISH_QUEUE),
            "queue submit (reply_to)",
            ctx.correlation_id(),
            format!("part {part}, reply_to the coordinator's queue"),
        );
        let submitted = client.submit(FINISH_QUEUE, [finished]).await?;
        let message_id = submitted
            .outcomes
            .first()
            .map(|o| o.message_id.clone())
            .unwrap_or_default();
        report(4, "handed to the queue".into()).await?;
        Ok(Envelope::json(
            "summary.queued",
            json!({ "part": part, "message_id": message_id }),
        ))
    }

    /// The consulted side (steps 6–7): the peer sends its keywords, this worker answers with
    /// its own for the same chain, once it has counted them.
    async fn converse(&self, ctx: Context, mut conversation: Conversation) -> Result<(), Status> {
        while let Some(proposal) = conversation.recv().await {
            let offer = proposal.json_payload().unwrap_or_default();
            self.chain.record(
                6,
                (offer["worker"].as_str().unwrap_or("a peer"), &self.name),
                "converse (peer to peer)",
                &proposal.correlation_id,
                format!(
                    "my keywords for part {}: {}",
                    offer["part"],
                    describe(&keywords_from_json(&offer["keywords"]))
                ),
            );
            let mut counted = self.keywords.subscribe();
            let chain = ctx.correlation_id().to_owned();
            let mine = tokio::time::timeout(
                CONSULT_WAIT,
                counted.wait_for(|by_chain| by_chain.contains_key(&chain)),
            )
            .await
            .map_err(|_| Status::deadline_exceeded("my own keywords were not counted in time"))?
            .map_err(|_| Status::unavailable("the worker is stopping"))?
            .get(&chain)
            .cloned()
            .unwrap_or_default();
            let mut answer = Envelope::json(
                "summary.keywords",
                json!({ "worker": self.name, "keywords": keywords_json(&mine) }),
            );
            answer.answer_to(&proposal, &self.name);
            conversation.send(answer).await?;
        }
        Ok(())
    }
}

impl Summarizer {
    /// The consulting side (steps 6–7): sends this part's keywords to `peer` and returns the
    /// keywords this part keeps, and those it leaves to the peer.
    async fn consult(
        &self,
        ctx: &Context,
        peer: &str,
        part: u64,
        mine: &[Keyword],
    ) -> Result<(Vec<Keyword>, Vec<String>), Status> {
        let client = ctx
            .client()
            .ok_or_else(|| Status::failed_precondition("the worker has no node to call through"))?;
        let (ours, mut theirs) = client.converse(peer, Duration::from_secs(1)).await?;
        let proposal = Envelope::json(
            "summary.keywords",
            json!({ "worker": self.name, "part": part, "keywords": keywords_json(mine) }),
        );
        ours.send(proposal)
            .await
            .map_err(|_| Status::unavailable(format!("the conversation with {peer} closed")))?;
        let answer = match tokio::time::timeout(CONSULT_WAIT, theirs.next()).await {
            Err(_) => return Err(Status::deadline_exceeded(format!("{peer} did not answer"))),
            Ok(None) => return Err(Status::unavailable(format!("{peer} hung up"))),
            Ok(Some(answer)) => answer?,
        };
        // Dropping our sender half-closes the conversation: the peer's handler ends.
        drop(ours);
        let claimed = keywords_from_json(&answer.json_payload().unwrap_or_default()["keywords"]);
        self.chain.record(
            7,
            (peer, &self.name),
            "converse (peer to peer)",
            &answer.correlation_id,
            format!("my keywords: {}", describe(&claimed)),
        );
        Ok(keep_after_consulting(mine, &claimed))
    }
}

/// Finishes a part taken from the finish queue: the acked result is stored by correlation id
/// and sent to the part's `reply_to` by the node.
async fn finish(name: String, job: Envelope) -> Result<Option<Envelope>, Status> {
    let mut part = job.json_payload().unwrap_or_default();
    part["finished_by"] = json!(name);
    Ok(Some(Envelope::json("summary.part", part)))
}

/// How a worker's runtime ends.
#[derive(Debug)]
enum Exit {
    /// Deregister, drain the queue consumer, stop serving.
    Stop,
    /// Drop everything at once, as a process that dies.
    Kill,
}

/// A worker running on a runtime of its own.
#[derive(Debug)]
pub struct LocalWorker {
    name: String,
    exit: Mutex<Option<oneshot::Sender<Exit>>>,
    stopped: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

impl LocalWorker {
    /// Starts worker `name` against the node at `node` and returns once it is registered and
    /// consuming the finish queue.
    pub async fn start(name: &str, node: &str, chain: Chain) -> Result<Self, Error> {
        let (ready, is_ready) = oneshot::channel::<Result<(), String>>();
        let (exit, exit_requested) = oneshot::channel::<Exit>();
        let (stopped, is_stopped) = oneshot::channel::<()>();
        let (worker_name, node) = (name.to_owned(), node.to_owned());
        std::thread::Builder::new()
            .name(format!("worker-{name}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(error.to_string()));
                        return;
                    }
                };
                runtime.block_on(serve(worker_name, node, chain, ready, exit_requested));
                // After a kill this drops the server, its connections, the heartbeats and the
                // queue consumer wherever they are.
                runtime.shutdown_background();
                let _ = stopped.send(());
            })?;
        is_ready
            .await
            .map_err(|_| format!("worker {name} stopped while starting"))?
            .map_err(|error| format!("worker {name} did not start: {error}"))?;
        Ok(Self {
            name: name.to_owned(),
            exit: Mutex::new(Some(exit)),
            stopped: tokio::sync::Mutex::new(Some(is_stopped)),
        })
    }

    /// The worker's agent name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Kills the worker: its runtime drops every task mid-call, without deregistering.
    pub fn kill(&self) {
        if let Some(exit) = self.exit.lock().expect("not poisoned").take() {
            let _ = exit.send(Exit::Kill);
        }
    }

    /// Stops the worker cleanly (deregisters, drains) unless it was killed, and waits until
    /// its runtime is gone.
    pub async fn stop(&self) {
        if let Some(exit) = self.exit.lock().expect("not poisoned").take() {
            let _ = exit.send(Exit::Stop);
        }
        if let Some(stopped) = self.stopped.lock().await.take() {
            let _ = stopped.await;
        }
    }
}

/// The worker's life on its own runtime: serve and consume until told to exit.
async fn serve(
    name: String,
    node: String,
    chain: Chain,
    ready: oneshot::Sender<Result<(), String>>,
    exit: oneshot::Receiver<Exit>,
) {
    let card = AgentCard {
        name: name.clone(),
        version: "1.0.0".into(),
        description: "summarizes a part of a document".into(),
        skills: vec![Skill {
            id: SKILL.into(),
            description: "word count and keywords of a text, agreed with the neighbouring part"
                .into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let agent = Summarizer {
        name: name.clone(),
        chain,
        keywords: watch::Sender::new(HashMap::new()),
    };
    let started = async {
        let agent = AgentRuntime::new(card, agent)
            .node(&node)
            .ttl(LEASE)
            .start()
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(5), agent.registered(1))
            .await
            .map_err(|_| format!("not registered with {node} within 5 s"))?;
        let client = MeshClient::connect_lazy(&node).map_err(|e| e.to_string())?;
        let finisher_name = name.clone();
        let finisher = Worker::new(client, FINISH_QUEUE)
            .consumer_id(format!("{name}-finisher"))
            .prefetch(1)
            .concurrency(1)
            .lease(Duration::from_secs(5))
            .start(move |_ctx, job| finish(finisher_name.clone(), job));
        Ok::<_, String>((agent, finisher))
    };
    let (agent, finisher) = match started.await {
        Ok(running) => running,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    match exit.await {
        Ok(Exit::Kill) => {}
        Ok(Exit::Stop) | Err(_) => {
            finisher.shutdown().await;
            agent.shutdown().await;
        }
    }
}
