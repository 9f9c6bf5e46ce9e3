//! `/metrics` as a Prometheus server reads it. A real node runs in-process on a real socket;
//! two agents are called (one answers, one refuses) and a queue is used (two messages acked,
//! one dead-lettered); then `/metrics` is scraped over HTTP and parsed as OpenMetrics text:
//! always by the structural checker in [`openmetrics`], and by Python's `prometheus_client`
//! parser in the ignored test that `.ci/run` runs with `AGENTMESH_TEST_PYTHON` set. Both
//! parses must show the same families with the same types and labels.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use agentmesh_node::{Node, NodeConfig};
use agentmesh_proto::v1::{AgentCard, Envelope};
use agentmesh_sdk::{Agent, AgentRuntime, Context, MeshClient, RunningAgent, Worker};
use tokio::sync::oneshot;
use tonic::{Code, Status};

use openmetrics::{Family, Sample};

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers with the request.
struct Echo;

#[tonic::async_trait]
impl Agent for Echo {
    async fn invoke(&self, _ctx: Context, request: Envelope) -> Result<Envelope, Status> {
        Ok(request)
    }
}

/// Refuses every request with INVALID_ARGUMENT, which the router does not retry.
struct Refuser;

#[tonic::async_trait]
impl Agent for Refuser {
    async fn invoke(&self, _ctx: Context, _request: Envelope) -> Result<Envelope, Status> {
        Err(Status::invalid_argument("refused for the test"))
    }
}

/// Starts `agent` as `name` against the node at `address`; returns once it is registered.
async fn start_agent(address: SocketAddr, name: &str, agent: impl Agent) -> RunningAgent {
    let card = AgentCard {
        name: name.into(),
        ..Default::default()
    };
    let running = AgentRuntime::new(card, agent)
        .node(address.to_string())
        .start()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.registered(1))
        .await
        .expect("the agent registers within 5 s");
    running
}

/// Starts a node, makes traffic of every kind `/metrics` reports, scrapes it once and stops.
async fn scrape_after_traffic() -> String {
    let data = tempfile::tempdir().unwrap();
    let mut config = NodeConfig {
        shutdown_grace: Duration::from_secs(1),
        ..Default::default()
    };
    config.queue.data_dir = data.path().to_owned();
    // One attempt: the failing message is a dead letter at once, not a retry a second later.
    config.queue.backend.defaults.max_attempts = 1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let node = tokio::spawn(Node::new(config).serve(listener, async move {
        let _ = stopped.await;
    }));

    let agents = [
        start_agent(address, "echo", Echo).await,
        start_agent(address, "refuser", Refuser).await,
    ];

    let client = MeshClient::connect_lazy(&address.to_string()).unwrap();
    let request = || Envelope::json("", serde_json::json!({ "text": "hi" }));
    client.invoke("echo", request()).await.unwrap();
    let refused = client.invoke("refuser", request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let job = |fail: bool| Envelope::json("job", serde_json::json!({ "fail": fail }));
    let submitted = client
        .submit("metered", [job(false), job(false), job(true)])
        .await
        .unwrap();
    assert_eq!(submitted.accepted, 3, "{submitted:?}");
    let worker = Worker::new(client.clone(), "metered").start(|_ctx, envelope| async move {
        match envelope.json_payload() {
            Some(payload) if payload["fail"] == true => Err(Status::internal("failed on purpose")),
            _ => Ok(None),
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while worker.stats().succeeded < 2 || worker.stats().failed < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not finish: {:?}",
            worker.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.shutdown().await;

    let response = reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], OPENMETRICS);
    let text = response.text().await.unwrap();

    for agent in agents {
        agent.shutdown().await;
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), node)
        .await
        .expect("the node stops within its grace period")
        .unwrap()
        .unwrap();
    text
}

/// The families `/metrics` must have after [`scrape_after_traffic`], with their types, labels
/// and the values the traffic makes certain.
fn assert_expected_families(families: &BTreeMap<String, Family>) {
    let family = |name: &str, kind: &str| -> &Family {
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in {:?}", families.keys()));
        assert_eq!(family.kind, kind, "type of {name}");
        assert!(!family.samples.is_empty(), "{name} has no samples");
        family
    };

    let calls = family("agentmesh_routed_calls_seconds", "histogram");
    for sample in &calls.samples {
        let mut names: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
        names.retain(|name| *name != "le");
        assert_eq!(names, ["code", "style", "target"], "{sample:?}");
    }
    let answered = [("target", "echo"), ("style", "unary"), ("code", "OK")];
    let refused = [
        ("target", "refuser"),
        ("style", "unary"),
        ("code", "INVALID_ARGUMENT"),
    ];
    let count = "agentmesh_routed_calls_seconds_count";
    assert_eq!(value(calls, count, &answered), 1.0);
    assert_eq!(value(calls, count, &refused), 1.0);

    for name in ["agentmesh_retries", "agentmesh_shed"] {
        let counter = family(name, "counter");
        assert!(value(counter, &format!("{name}_total"), &[]) >= 0.0);
    }

    for name in ["agentmesh_breaker_state", "agentmesh_instance_in_flight"] {
        let gauge = family(name, "gauge");
        for agent in ["echo", "refuser"] {
            let sample = gauge
                .samples
                .iter()
                .find(|s| s.labels.get("agent").map(String::as_str) == Some(agent))
                .unwrap_or_else(|| panic!("{name} has no sample for {agent}: {gauge:?}"));
            assert!(sample.labels.contains_key("instance"), "{sample:?}");
        }
    }

    let queue = [("queue", "metered")];
    let queue_gauges = [
        ("agentmesh_queue_depth", 0.0),
        ("agentmesh_queue_in_flight", 0.0),
        ("agentmesh_queue_dead_letters", 1.0),
    ];
    for (name, expected) in queue_gauges {
        assert_eq!(
            value(family(name, "gauge"), name, &queue),
            expected,
            "{name}"
        );
    }
    let oldest = "agentmesh_queue_oldest_age_seconds";
    assert!(value(family(oldest, "gauge"), oldest, &queue) >= 0.0);
    let up = "agentmesh_queue_store_up";
    assert_eq!(value(family(up, "gauge"), up, &[]), 1.0);
    for name in [
        "commits",
        "fsyncs",
        "accepted_messages",
        "transactions",
        "timer_wakeups",
    ] {
        let name = format!("agentmesh_queue_store_{name}");
        let counter = family(&name, "counter");
        assert!(value(counter, &format!("{name}_total"), &[]) >= 0.0);
    }
    let accepted = "agentmesh_queue_store_accepted_messages";
    let accepted = value(
        family(accepted, "counter"),
        &format!("{accepted}_total"),
        &[],
    );
    assert!(accepted >= 3.0, "{accepted}");

    let cpu = family("process_cpu_seconds", "counter");
    assert!(value(cpu, "process_cpu_seconds_total", &[]) > 0.0);
    let memory = "process_resident_memory_bytes";
    assert!(value(family(memory, "gauge"), memory, &[]) > 0.0);
}

/// The value of the one sample of `family` named `name` whose labels include `labels`.
fn value(family: &Family, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&Sample> = family
        .samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    match matching.as_slice() {
        [sample] => sample.value,
        _ => panic!("not one {name} sample with {labels:?}: {matching:?} in {family:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_openmetrics_text_format() {
    let text = scrape_after_traffic().await;
    let families = openmetrics::parse(&text).unwrap_or_else(|error| panic!("{error}\n{text}"));
    assert_expected_families(&families);
}

/// Reads the scrape with `prometheus_client.openmetrics.parser` and prints each family's type
/// and samples as JSON; values as text, since JSON has no infinity.
const PYTHON_PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
with open(sys.argv[1], encoding="utf-8") as scrape:
    text = scrape.read()
families = {
    family.name: {
        "kind": family.type,
        "samples": [
            {"name": s.name, "labels": s.labels, "value": repr(float(s.value))}
            for s in family.samples
        ],
    }
    for family in text_string_to_metric_families(text)
}
print(json.dumps(families))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AGENTMESH_TEST_PYTHON"]
async fn metrics_pass_the_python_prometheus_client_parser() {
    let python = std::env::var("AGENTMESH_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "set AGENTMESH_TEST_PYTHON to a Python with prometheus-client \
             (python3 -m pip install prometheus-client)"
        )
    });
    let text = scrape_after_traffic().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(PYTHON_PARSER)
        .arg(&path)
        .output()
        .await
        .unwrap_or_else(|error| panic!("cannot run {python}: {error}"));
    assert!(
        output.status.success(),
        "prometheus_client rejects /metrics:\n{}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("the script prints JSON");
    let families = parsed
        .into_iter()
        .map(|(name, family)| {
            let samples = family["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|sample| Sample {
                    name: sample["name"].as_str().unwrap().to_owned(),
                    labels: serde_json::from_value(sample["labels"].clone()).unwrap(),
                    value: sample["value"].as_str().unwrap().parse().unwrap(),
                })
                .collect();
            let kind = family["kind"].as_str().unwrap().to_owned();
            (name, Family { kind, samples })
        })
        .collect();
    assert_expected_families(&families);
}

/// A checker of the OpenMetrics text format (the rules Prometheus and `prometheus_client`
/// enforce when they read it), so a malformed exposition fails without Python.
mod openmetrics {
    use std::collections::{BTreeMap, HashSet};

    /// One metric family: its declared type and its samples.
    #[derive(Debug)]
    pub(crate) struct Family {
        pub(crate) kind: String,
        pub(crate) samples: Vec<Sample>,
    }

    /// One sample line.
    #[derive(Debug)]
    pub(crate) struct Sample {
        pub(crate) name: String,
        pub(crate) labels: BTreeMap<String, String>,
        pub(crate) value: f64,
    }

    /// The sample-name suffixes a family of each type may use.
    fn suffixes(kind: &str) -> &'static [&'static str] {
        match kind {
            "counter" => &["_total", "_created"],
            "gauge" | "unknown" | "stateset" => &[""],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
            "summary" => &["", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[],
        }
    }

    fn is_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Parses `text`, or says which line breaks which rule.
    pub(crate) fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
        let body = text
            .strip_suffix("# EOF\n")
            .ok_or("the exposition does not end with \"# EOF\\n\"")?;
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        // Metadata seen per family (HELP, TYPE, UNIT), and the family being read.
        let mut metadata: HashSet<(String, &str)> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
        for (number, line) in body.lines().enumerate() {
            let at = |message: String| format!("line {}: {message}: {line:?}", number + 1);
            if let Some(comment) = line.strip_prefix("# ") {
                let mut parts = comment.splitn(3, ' ');
                let keyword = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default().to_owned();
                let rest = parts.next().unwrap_or_default();
                let keyword = match keyword {
                    "HELP" => "HELP",
                    "TYPE" => "TYPE",
                    "UNIT" => "UNIT",
                    other => return Err(at(format!("{other:?} is not HELP, TYPE or UNIT"))),
                };
                if !is_name(&name) {
                    return Err(at(format!("{name:?} is not a metric name")));
                }
                if current.as_deref() != Some(name.as_str()) {
                    if metadata.iter().any(|(seen, _)| *seen == name) {
                        return Err(at(format!("family {name} continues after another")));
                    }
                    current = Some(name.clone());
                }
                if let Some(family) = families.get(&name) {
                    if !family.samples.is_empty() {
                        return Err(at(format!("{keyword} after the samples of {name}")));
                    }
                }
                if !metadata.insert((name.clone(), keyword)) {
                    return Err(at(format!("second {keyword} for {name}")));
                }
                match keyword {
                    "TYPE" => {
                        if suffixes(rest).is_empty() {
                            return Err(at(format!("{rest:?} is not a metric type")));
                        }
                        families.insert(
                            name,
                            Family {
                                kind: rest.to_owned(),
                                samples: Vec::new(),
                            },
                        );
                    }
                    "UNIT" if !name.ends_with(&format!("_{rest}")) => {
                        return Err(at(format!("{name} does not end with its unit {rest}")));
                    }
                    _ => {}
                }
                continue;
            }
            let (name, labels, value) = sample(line).map_err(at)?;
            let family_name = current
                .clone()
                .ok_or_else(|| at("a sample before any family".into()))?;
            let family = families
                .get_mut(&family_name)
                .ok_or_else(|| at(format!("family {family_name} has no TYPE")))?;
            let suffix = name
                .strip_prefix(family_name.as_str())
                .filter(|suffix| suffixes(&family.kind).contains(suffix))
                .ok_or_else(|| {
                    at(format!(
                        "{name} is not a sample of {} {family_name}",
                        family.kind
                    ))
                })?;
            if suffix == "_bucket" && !labels.contains_key("le") {
                return Err(at("a bucket without le".into()));
            }
            // NaN counts as negative: a counter is a number of events.
            if suffix == "_total" && (value < 0.0 || value.is_nan()) {
                return Err(at("a negative counter".into()));
            }
            let key: Vec<_> = labels.clone().into_iter().collect();
            if !series.insert((name.clone(), key)) {
                return Err(at("the same series twice".into()));
            }
            family.samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        for (name, family) in &families {
            if family.kind == "histogram" {
                check_histogram(name, family)?;
            }
        }
        Ok(families)
    }

    /// `name{label="value",...} value [timestamp]`.
    fn sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| "not a sample".to_owned())?;
        let name = &line[..name_end];
        if !is_name(name) {
            return Err(format!("{name:?} is not a metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inside) = rest.strip_prefix('{') {
            let mut chars = inside.char_indices().peekable();
            loop {
                if let Some((i, '}')) = chars.peek().copied() {
                    rest = &inside[i + 1..];
                    break;
                }
                let start = chars.peek().map(|(i, _)| *i).ok_or("unclosed labels")?;
                let equals = inside[start..].find('=').ok_or("a label without =")? + start;
                let label = &inside[start..equals];
                if !is_name(label) || label.contains(':') {
                    return Err(format!("{label:?} is not a label name"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= equals) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(format!("the value of {label} is not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => return Err(format!("bad escape {other:?} in {label}")),
                        },
                        Some(c) => value.push(c),
                        None => return Err(format!("unterminated value of {label}")),
                    }
                }
                if labels.insert(label.to_owned(), value).is_some() {
                    return Err(format!("label {label} twice"));
                }
                match chars.peek().map(|(_, c)| *c) {
                    Some(',') => {
                        chars.next();
                    }
                    Some('}') => {}
                    other => return Err(format!("{other:?} after the value of {label}")),
                }
            }
        }
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or("no blank before the value")?
            .split(' ');
        let value = fields.next().unwrap_or_default();
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            number => number
                .parse()
                .map_err(|_| format!("{number:?} is not a number"))?,
        };
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<f64>()
                .map_err(|_| format!("{timestamp:?} is not a timestamp"))?;
        }
        if fields.next().is_some() {
            return Err("more than a value and a timestamp".into());
        }
        Ok((name.to_owned(), labels, value))
    }

    /// Per series: buckets by rising `le`, counts never falling, the last at `+Inf` and equal
    /// to `_count`, and a `_sum`.
    fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
        let series = |sample: &Sample| {
            let mut labels = sample.labels.clone();
            labels.remove("le");
            labels
        };
        let mut buckets: BTreeMap<_, Vec<(f64, f64)>> = BTreeMap::new();
        for sample in family.samples.iter() {
            if sample.name.ends_with("_bucket") {
                let le: f64 = match sample.labels["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    bound => bound.parse().map_err(|_| format!("{name}: le {bound:?}"))?,
                };
                buckets
                    .entry(series(sample))
                    .or_default()
                    .push((le, sample.value));
            }
        }
        for (labels, bounds) in &buckets {
            let rising = bounds
                .windows(2)
                .all(|pair| pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1);
            if !rising {
                return Err(format!("{name}{labels:?}: buckets out of order {bounds:?}"));
            }
            let of = |suffix: &str| {
                family
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{name}{suffix}") && series(s) == *labels)
                    .map(|s| s.value)
            };
            let last = bounds.last().copied().unwrap_or_default();
            if last.0 != f64::INFINITY || Some(last.1) != of("_count") || of("_sum").is_none() {
                return Err(format!(
                    "{name}{labels:?}: the +Inf bucket, _count and _sum disagree"
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn the_checker_rejects_what_openmetrics_forbids() {
        let good = "# TYPE a counter\na_total 1\n# TYPE b gauge\nb{x=\"1\"} 2\n# EOF\n";
        assert!(parse(good).is_ok(), "{:?}", parse(good).err());
        let cases = [
            ("# TYPE a counter\na_total 1\n", "EOF"),
            ("a_total 1\n# EOF\n", "before any family"),
            (
                "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# TYPE a gauge\n# EOF\n",
                "continues",
            ),
            ("# TYPE a counter\na 1\n# EOF\n", "not a sample"),
            (
                "# TYPE a gauge\n# TYPE a gauge\na 1\n# EOF\n",
                "second TYPE",
            ),
            ("# TYPE a gauge\na{x=1} 1\n# EOF\n", "not quoted"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n\
                 h_count 1\nh_sum 1\n# EOF\n",
                "out of order",
            ),
            (
                "# TYPE a_bytes gauge\n# UNIT a_bytes seconds\n# EOF\n",
                "unit",
            ),
        ];
        for (text, complaint) in cases {
            let error = parse(text).expect_err(text);
            assert!(error.contains(complaint), "{complaint:?} not in {error:?}");
        }
    }
}
