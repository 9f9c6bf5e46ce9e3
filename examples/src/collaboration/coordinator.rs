//! The coordinator: discovers workers by skill (steps 1–2), assigns the parts with one
//! fan-out (3–4), follows each part's progress stream (5), and collects the finished parts
//! from its own reply queue by correlation id (9). Every call it makes carries its one
//! correlation id.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use agentmesh_sdk::{
    CallOptions, MeshClient, Worker,
    proto::{
        metadata::CORRELATION_ID,
        v1::{
            AgentFilter, Envelope, FanOutPolicy, FanOutRequest, LookupRequest, StreamEventKind,
            fan_out_result::Outcome,
        },
    },
};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::{Request, Status};

use super::{
    Error, MissingPart, Outcome as Collaboration, PartSummary,
    chain::Chain,
    document::{Part, describe, document, keywords_from_json},
    worker::{LocalWorker, SKILL},
};

/// How long the workers have to accept their parts (the fan-out's best-effort deadline).
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one part's work may stream.
const WORK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the finished parts may take to come back through the queue after the work ended.
const RESULTS_TIMEOUT: Duration = Duration::from_secs(10);

/// A coordinator for one run.
pub(crate) struct Coordinator {
    pub(crate) client: MeshClient,
    pub(crate) chain: Chain,
    pub(crate) correlation_id: String,
    /// A worker to kill as soon as its first progress report arrives.
    pub(crate) victim: Option<Arc<LocalWorker>>,
}

/// Which worker a part went to.
#[derive(Debug, Clone)]
struct Assignment {
    part: Part,
    worker: String,
}

impl Coordinator {
    /// Runs the collaboration to its end, complete or partial.
    pub(crate) async fn run(self) -> Result<Collaboration, Error> {
        let this = Arc::new(self);
        let workers = this.discover().await?;
        let plan = assign(document(), &workers);

        // Started first: the queue keeps replies anyway, but this prints them as they come.
        let reply_to = format!("collaboration.replies.{}", this.correlation_id);
        let (replies, mut received) = mpsc::unbounded_channel();
        let collector = Worker::new(this.client.clone(), reply_to.clone()).start({
            let this = Arc::clone(&this);
            move |_ctx, reply: Envelope| {
                this.receive_reply(&reply, &replies);
                async { Ok(None) }
            }
        });

        let mut missing = BTreeMap::new();
        let accepted = this.fan_out(&plan, &workers, &mut missing).await?;

        // Every accepted part streams its progress at the same time.
        let streams: Vec<_> = accepted
            .iter()
            .map(|assignment| {
                let this = Arc::clone(&this);
                let consult = consultation(&plan, assignment);
                let (assignment, reply_to) = (assignment.clone(), reply_to.clone());
                tokio::spawn(async move {
                    let outcome = this.follow(&assignment, consult, &reply_to).await;
                    (assignment, outcome)
                })
            })
            .collect();
        let mut expected = Vec::new();
        for stream in streams {
            let (assignment, outcome) = stream.await?;
            match outcome {
                Ok(()) => expected.push(assignment),
                Err(status) => {
                    let reason = format!(
                        "its stream ended with {:?}: {}",
                        status.code(),
                        status.message()
                    );
                    missing.insert(assignment.part.number, missing_part(&assignment, reason));
                }
            }
        }

        let mut summaries = BTreeMap::new();
        let waiting_until = tokio::time::Instant::now() + RESULTS_TIMEOUT;
        while expected
            .iter()
            .any(|a| !summaries.contains_key(&a.part.number))
        {
            match tokio::time::timeout_at(waiting_until, received.recv()).await {
                Ok(Some(summary @ PartSummary { part, .. })) => {
                    summaries.insert(part, summary);
                }
                Ok(None) | Err(_) => break,
            }
        }
        collector.shutdown().await;
        for assignment in expected {
            if !summaries.contains_key(&assignment.part.number) {
                let reason = format!("no result came back within {} s", RESULTS_TIMEOUT.as_secs());
                missing.insert(assignment.part.number, missing_part(&assignment, reason));
            }
        }
        Ok(Collaboration {
            correlation_id: this.correlation_id.clone(),
            steps: this.chain.steps(),
            summaries: summaries.into_values().collect(),
            missing: missing.into_values().collect(),
        })
    }

    /// Steps 1–2: the workers offering the skill, by name.
    async fn discover(&self) -> Result<Vec<String>, Error> {
        self.chain.record(
            1,
            ("coordinator", "discovery"),
            "unary (Lookup)",
            &self.correlation_id,
            format!("who offers skill \"{SKILL}\"?"),
        );
        let mut request = Request::new(LookupRequest {
            filter: Some(AgentFilter {
                skill: SKILL.into(),
                ..Default::default()
            }),
        });
        request
            .metadata_mut()
            .insert(CORRELATION_ID, self.correlation_id.parse()?);
        let response = self.client.discovery().lookup(request).await?;
        // The node's edge echoes the correlation id it filed the call under.
        let echoed = response
            .metadata()
            .get(CORRELATION_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut workers: Vec<String> = response
            .into_inner()
            .instances
            .into_iter()
            .filter_map(|instance| instance.card.map(|card| card.name))
            .collect();
        workers.sort();
        workers.dedup();
        self.chain.record(
            2,
            ("discovery", "coordinator"),
            "unary (Lookup)",
            &echoed,
            format!("{} found: {}", workers.len(), workers.join(", ")),
        );
        if workers.is_empty() {
            return Err(format!("no agent offers skill \"{SKILL}\"").into());
        }
        Ok(workers)
    }

    /// Steps 3–4: one fan-out carries the whole plan to every worker; each accepts its parts.
    /// Best effort: a worker that fails or does not answer in time costs only its parts.
    async fn fan_out(
        &self,
        plan: &[Assignment],
        workers: &[String],
        missing: &mut BTreeMap<u32, MissingPart>,
    ) -> Result<Vec<Assignment>, Error> {
        let parts: Vec<_> = plan
            .iter()
            .map(|a| json!({ "part": a.part.number, "title": a.part.title, "worker": a.worker }))
            .collect();
        let mut envelope = Envelope::json("summary.plan", json!({ "plan": parts }));
        envelope.correlation_id = self.correlation_id.clone();
        let request = FanOutRequest {
            envelope: Some(envelope),
            targets: workers.to_vec(),
            policy: FanOutPolicy::BestEffort as i32,
            ..Default::default()
        };
        let options = CallOptions {
            timeout: Some(ASSIGNMENT_TIMEOUT),
            ..Default::default()
        };
        let response = self.client.fan_out_with(request, options).await?;
        let mut accepted_by = HashMap::new();
        for result in response.results {
            let latency = result
                .latency
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default();
            let route = (result.target.as_str(), "coordinator");
            match result.outcome {
                Some(Outcome::Envelope(reply)) => {
                    let count = reply.json_payload().unwrap_or_default()["accepted"].clone();
                    self.chain.record(
                        4,
                        route,
                        "fan-out reply",
                        &reply.correlation_id,
                        format!("accepted {count} part(s) in {} ms", latency.as_millis()),
                    );
                    accepted_by.insert(result.target, true);
                }
                Some(Outcome::Error(error)) => {
                    self.chain.note(format!(
                        "{} did not accept its parts: {}",
                        result.target, error.message
                    ));
                    accepted_by.insert(result.target, false);
                }
                None => {}
            }
        }
        let mut accepted = Vec::new();
        for assignment in plan {
            if accepted_by.get(&assignment.worker) == Some(&true) {
                accepted.push(assignment.clone());
            } else {
                let reason = "its worker did not accept it (fan-out, best effort)".to_owned();
                missing.insert(assignment.part.number, missing_part(assignment, reason));
            }
        }
        Ok(accepted)
    }

    /// Step 5: starts the work on one part and prints its progress as it streams in; `Ok` once
    /// the worker has put the part on the queue.
    async fn follow(
        &self,
        assignment: &Assignment,
        consult: Option<String>,
        reply_to: &str,
    ) -> Result<(), Status> {
        let Assignment { part, worker } = assignment;
        let mut request = Envelope::json(
            "summary.part",
            json!({
                "part": part.number,
                "title": part.title,
                "text": part.text,
                "consult": consult,
                "reply_to": reply_to,
            }),
        );
        request.correlation_id = self.correlation_id.clone();
        let options = CallOptions {
            timeout: Some(WORK_TIMEOUT),
            ..Default::default()
        };
        let mut events = self.client.stream_with(worker, request, options).await?;
        let mut first = true;
        while let Some(event) = events.message().await? {
            match event.kind() {
                StreamEventKind::Result => return Ok(()),
                StreamEventKind::Error => {
                    let error = event.error.unwrap_or_default();
                    return Err(Status::new(error.code.into(), error.message));
                }
                _ => {}
            }
            let Some(report) = event.envelope else {
                continue;
            };
            let progress = report.json_payload().unwrap_or_default();
            self.chain.record(
                5,
                (worker, "coordinator"),
                "server stream (progress)",
                &report.correlation_id,
                format!(
                    "part {} {}/{}: {}",
                    part.number,
                    progress["step"],
                    progress["of"],
                    progress["note"].as_str().unwrap_or_default()
                ),
            );
            if first {
                first = false;
                if let Some(victim) = self.victim.as_ref().filter(|v| v.name() == worker) {
                    self.chain.note(format!(
                        "killing {worker} mid-run: its runtime drops every connection, it never deregisters"
                    ));
                    victim.kill();
                }
            }
        }
        Err(Status::unavailable(format!(
            "{worker}'s stream ended without a result"
        )))
    }

    /// Step 9: a finished part on the reply queue; only this chain's replies count.
    fn receive_reply(&self, reply: &Envelope, replies: &mpsc::UnboundedSender<PartSummary>) {
        if reply.correlation_id != self.correlation_id {
            self.chain.note(format!(
                "ignored a reply of another chain ({})",
                reply.correlation_id
            ));
            return;
        }
        let body = reply.json_payload().unwrap_or_default();
        let summary = PartSummary {
            part: body["part"].as_u64().unwrap_or_default() as u32,
            title: body["title"].as_str().unwrap_or_default().to_owned(),
            worker: body["worker"].as_str().unwrap_or_default().to_owned(),
            finished_by: body["finished_by"].as_str().unwrap_or_default().to_owned(),
            words: body["words"].as_u64().unwrap_or_default(),
            keywords: keywords_from_json(&body["keywords"]),
        };
        self.chain.record(
            9,
            ("reply queue", "coordinator"),
            "queue consume (by correlation)",
            &reply.correlation_id,
            format!(
                "part {}: {} words, keywords {} (finished by {})",
                summary.part,
                summary.words,
                describe(&summary.keywords),
                summary.finished_by
            ),
        );
        let _ = replies.send(summary);
    }
}

/// The parts, dealt to the workers in turn.
fn assign(parts: Vec<Part>, workers: &[String]) -> Vec<Assignment> {
    parts
        .into_iter()
        .zip(workers.iter().cycle())
        .map(|(part, worker)| Assignment {
            part,
            worker: worker.clone(),
        })
        .collect()
}

/// The first part's worker consults the second part's worker: neighbouring parts may share
/// keywords, and they agree on who keeps them.
fn consultation(plan: &[Assignment], assignment: &Assignment) -> Option<String> {
    match plan {
        [first, second, ..] if first.part == assignment.part && first.worker != second.worker => {
            Some(second.worker.clone())
        }
        _ => None,
    }
}

fn missing_part(assignment: &Assignment, reason: String) -> MissingPart {
    MissingPart {
        part: assignment.part.number,
        title: assignment.part.title.to_owned(),
        worker: assignment.worker.clone(),
        reason,
    }
}
