//! Embedded-backend specifics: storage errors, and durability across `kill -9`.

use agentmesh_queue::{
    BackendConfig, EmbeddedBackend, NewMessage, QueueBackend, QueueError, SubmitFate,
};
use bytes::Bytes;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Set (to a directory) when this binary is re-executed as the crash-test child.
const CHILD_DIR_ENV: &str = "AGENTMESH_QUEUE_CRASH_CHILD_DIR";
/// Distinguishes the ids of successive children.
const CHILD_ROUND_ENV: &str = "AGENTMESH_QUEUE_CRASH_CHILD_ROUND";
const STORM_QUEUE: &str = "storm";
const ACCEPTED: &str = "ACCEPTED ";

fn storm_body(id: &str) -> Bytes {
    let mut body = Vec::with_capacity(256);
    while body.len() < 256 {
        body.extend_from_slice(id.as_bytes());
        body.push(b'|');
    }
    body.truncate(256);
    Bytes::from(body)
}

fn storage_message(err: QueueError) -> String {
    match err {
        QueueError::Storage(m) => m,
        other => panic!("expected a Storage error, got {other:?}"),
    }
}

#[test]
fn unwritable_directory_is_a_storage_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // A regular file where a directory should be: fails even for root.
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let err = EmbeddedBackend::open(&file.join("queues"), BackendConfig::default())
        .expect_err("open under a file must fail");
    let m = storage_message(err);
    assert!(
        m.contains("not-a-dir"),
        "message does not name the path: {m}"
    );

    // The database path is taken by a directory.
    let taken = tmp.path().join("taken");
    std::fs::create_dir_all(taken.join(agentmesh_queue::DATABASE_FILE)).expect("mkdir");
    let m = storage_message(
        EmbeddedBackend::open(&taken, BackendConfig::default()).expect_err("must fail"),
    );
    assert!(
        m.contains("queue.redb"),
        "message does not name the file: {m}"
    );

    // A file that is not a database.
    let garbage = tmp.path().join("garbage");
    std::fs::create_dir_all(&garbage).expect("mkdir");
    std::fs::write(
        garbage.join(agentmesh_queue::DATABASE_FILE),
        vec![0xA5u8; 64 * 1024],
    )
    .expect("write");
    let m = storage_message(
        EmbeddedBackend::open(&garbage, BackendConfig::default()).expect_err("must fail"),
    );
    assert!(m.contains("queue.redb"), "{m}");

    // A read-only directory (permissions do not stop root, so only checked when they apply).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("read-only");
        std::fs::create_dir_all(&ro).expect("mkdir");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        if std::fs::write(ro.join("probe"), b"x").is_err() {
            let m = storage_message(
                EmbeddedBackend::open(&ro, BackendConfig::default()).expect_err("must fail"),
            );
            assert!(m.contains("read-only"), "{m}");
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

#[test]
fn invalid_config_is_rejected() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = BackendConfig::default();
    config.defaults.max_attempts = 0;
    assert!(matches!(
        EmbeddedBackend::open(tmp.path(), config),
        Err(QueueError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_backend_refuses_calls_and_releases_the_file() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let b = EmbeddedBackend::open(tmp.path(), BackendConfig::default()).expect("open");
    b.submit("q", vec![NewMessage::new("a", "x")])
        .await
        .expect("submit");
    b.close();
    assert_eq!(
        b.submit("q", vec![NewMessage::new("b", "x")]).await,
        Err(QueueError::Closed)
    );
    assert_eq!(b.get_result("c").await, Err(QueueError::Closed));
    // The file is released: a second backend opens while the first handle still exists.
    let again = EmbeddedBackend::open(tmp.path(), BackendConfig::default()).expect("reopen");
    assert_eq!(again.stats().await.expect("stats")[0].depth, 1);
    again
        .submit("q", vec![NewMessage::new("c", "x")])
        .await
        .expect("submit");
    let io = again.io_stats();
    assert_eq!((io.accepted_messages, io.submit_commits), (1, 1));
    assert!(io.durable_commits >= 1 && io.commits >= io.durable_commits);
}

/// Child side of the crash test: storms the queue until it is killed. Does nothing (and
/// passes) unless re-executed by `kill_9_mid_storm_loses_no_accepted_message`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let round = std::env::var(CHILD_ROUND_ENV).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let b = Arc::new(
            EmbeddedBackend::open(Path::new(&dir), BackendConfig::default()).expect("child open"),
        );
        let mut tasks = Vec::new();
        for t in 0..16 {
            let b = b.clone();
            let round = round.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let n = 1 + (i % 4) as usize;
                    let batch: Vec<NewMessage> = (0..n)
                        .map(|k| {
                            let id = format!("{round}-{t}-{i}-{k}");
                            let body = storm_body(&id);
                            NewMessage::new(id, body)
                        })
                        .collect();
                    let fates = b.submit(STORM_QUEUE, batch).await.expect("child submit");
                    let mut out = String::new();
                    for f in fates {
                        if let SubmitFate::Accepted { id } = f {
                            out.push_str(ACCEPTED);
                            out.push_str(&id);
                            out.push('\n');
                        }
                    }
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(out.as_bytes()).expect("stdout");
                    stdout.flush().expect("flush");
                }
            }));
        }
        // Meanwhile, churn another queue so acks, nacks and non-durable commits interleave.
        let churn = b.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let batch = (0..8)
                    .map(|k| NewMessage::new(format!("c{i}-{k}"), "churn"))
                    .collect();
                churn.submit("churn", batch).await.expect("churn submit");
                let got = churn
                    .receive(
                        "churn",
                        "churner",
                        8,
                        Duration::from_secs(30),
                        Duration::ZERO,
                    )
                    .await
                    .expect("churn receive");
                for (j, m) in got.into_iter().enumerate() {
                    if j % 3 == 0 {
                        let _ = churn.nack(&m.receipt, "churn", Some(Duration::ZERO)).await;
                    } else {
                        let _ = churn.ack(&m.receipt, Some(Bytes::from_static(b"r"))).await;
                    }
                }
            }
        }));
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// Parent side: SIGKILLs the child mid-storm (three times, on the same directory) and checks that
/// every id the child printed as accepted is receivable, with its exact body, after reopening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_storm_loses_no_accepted_message() {
    if std::env::var(CHILD_DIR_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("current exe");
    let mut accepted_total: HashSet<String> = HashSet::new();
    for (round, kill_after) in [(1u32, 2_000usize), (2, 7_000), (3, 400)] {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_DIR_ENV, tmp.path())
            .env(CHILD_ROUND_ENV, format!("r{round}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    // A line cut by the kill has no newline: the id may be incomplete, skip it.
                    Ok(_) if !line.ends_with('\n') => return,
                    Ok(_) => {
                        if let Some(id) = line.trim_end().strip_prefix(ACCEPTED) {
                            if tx.send(id.to_owned()).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let started = Instant::now();
        let mut seen = 0usize;
        let mut ids = Vec::new();
        while seen < kill_after {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(id) => {
                    seen += 1;
                    ids.push(id);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("child stopped printing after {seen} ids");
                }
            }
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("wait child");
        assert!(!status.success(), "child exited on its own: {status}");
        reader.join().expect("reader");
        ids.extend(rx.try_iter());
        eprintln!(
            "crash round {round}: killed after {:?}, {} ids printed",
            started.elapsed(),
            ids.len()
        );
        accepted_total.extend(ids);

        let dir = tmp.path().to_owned();
        let b = tokio::task::spawn_blocking(move || {
            EmbeddedBackend::open(&dir, BackendConfig::default())
        })
        .await
        .expect("join")
        .expect("reopen after kill -9");
        let mut received: HashSet<String> = HashSet::new();
        loop {
            let got = b
                .receive(
                    STORM_QUEUE,
                    "verifier",
                    4096,
                    Duration::from_secs(60),
                    Duration::ZERO,
                )
                .await
                .expect("receive");
            if got.is_empty() {
                break;
            }
            for m in got {
                assert_eq!(
                    m.body,
                    storm_body(&m.message_id),
                    "corrupt body for {}",
                    m.message_id
                );
                assert!(
                    received.insert(m.message_id.clone()),
                    "{} twice",
                    m.message_id
                );
            }
        }
        let missing: Vec<&String> = accepted_total.difference(&received).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} accepted ids lost, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        assert!(received.len() >= accepted_total.len());
        // Dropping the backend drops the leases: the next round sees everything ready again.
        drop(b);
    }
}

/// The writer sleeps when nothing is due: after submit → receive → ack it flushes the acks
/// once (a timer turn) and then begins no transaction; a dedup key that expires wakes it once
/// to sweep, with no request needed.
#[tokio::test]
async fn idle_writer_begins_no_transactions() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut config = BackendConfig::default();
    config.defaults.dedup_window = Duration::from_millis(300);
    let b = EmbeddedBackend::open(tmp.path(), config).expect("open");
    let msgs: Vec<NewMessage> = (0..50)
        .map(|i| NewMessage::new(format!("m{i}"), vec![b'x'; 64]))
        .collect();
    b.submit("q", msgs).await.expect("submit");
    let keyed = NewMessage::new("k", vec![b'k'; 8]).with_idempotency_key("key");
    b.submit("q", vec![keyed.clone()]).await.expect("submit");
    let leased = b
        .receive("q", "c", 64, Duration::from_secs(30), Duration::ZERO)
        .await
        .expect("receive");
    assert_eq!(leased.len(), 51);
    for l in &leased {
        b.ack(&l.receipt, None).await.expect("ack");
    }
    let acked = b.io_stats();
    // Once the flush interval (100 ms) has passed, a timer turn makes the acks durable.
    let until = Instant::now() + Duration::from_secs(5);
    let flushed = loop {
        let now = b.io_stats();
        if now.durable_commits > acked.durable_commits {
            break now;
        }
        assert!(
            Instant::now() < until,
            "the acks were never flushed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The dedup key expired at 300 ms; the sweep may run once a second after the last one.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let swept = b.io_stats();
    let again = b.submit("q", vec![keyed]).await.expect("submit");
    assert!(
        matches!(again[0], SubmitFate::Accepted { .. }),
        "expired key still held: {again:?}"
    );
    // The new key expires too and is swept (at most a second after the last sweep), then its
    // removal is flushed; from there on nothing is due: no timer turn, no transaction.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let quiet = b.io_stats();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = b.io_stats();
    assert_eq!(later, quiet, "idle writer did work");
    assert!(
        swept.timer_wakeups - flushed.timer_wakeups <= 2,
        "sweeping took {} timer turns",
        swept.timer_wakeups - flushed.timer_wakeups
    );
    b.close();
}

/// A store whose file is damaged opens or fails with a storage error, and a store that opens
/// answers every request, never panicking: redb panics on some damaged pages (a page whose type
/// byte is neither leaf nor branch hits an `unreachable!`, found by the `store_recovery` fuzz
/// target), and the store turns that into errors.
#[tokio::test]
async fn damaged_pages_fail_with_storage_errors() {
    const PAGE: usize = 4096;
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let b = EmbeddedBackend::open(dir.path(), BackendConfig::default()).expect("open");
        let messages = (0..20)
            .map(|i| NewMessage::new(format!("m{i}"), vec![b'x'; 300]))
            .collect();
        b.submit("q", messages).await.expect("submit");
        let got = b
            .receive("q", "c", 5, Duration::from_secs(60), Duration::ZERO)
            .await
            .expect("receive");
        b.ack(&got[0].receipt, Some(Bytes::from_static(b"r")))
            .await
            .expect("ack");
        b.nack(&got[1].receipt, "x", Some(Duration::from_secs(3600)))
            .await
            .expect("nack");
    }
    let pristine = std::fs::read(dir.path().join(agentmesh_queue::DATABASE_FILE)).expect("read");
    let mut opened = 0;
    for page in 0..pristine.len() / PAGE {
        let mut file = pristine.clone();
        // The byte that says whether a B-tree page is a leaf or a branch.
        file[page * PAGE] = 0xee;
        let damaged = tempfile::tempdir().expect("temp dir");
        std::fs::write(damaged.path().join(agentmesh_queue::DATABASE_FILE), &file).expect("write");
        let b = match EmbeddedBackend::open(damaged.path(), BackendConfig::default()) {
            Ok(b) => b,
            Err(e) => {
                assert!(matches!(e, QueueError::Storage(_)), "page {page}: {e:?}");
                continue;
            }
        };
        opened += 1;
        let lease = Duration::from_secs(60);
        let answers = [
            b.stats().await.map(drop),
            b.receive("q", "c", 100, lease, Duration::ZERO)
                .await
                .map(drop),
            b.submit("q", vec![NewMessage::new("new", "body")])
                .await
                .map(drop),
            b.list_dead_letters("q", 10, None).await.map(drop),
        ];
        for answer in answers {
            if let Err(e) = answer {
                assert!(
                    matches!(e, QueueError::Storage(_) | QueueError::NotFound(_)),
                    "page {page}: {e:?}"
                );
            }
        }
    }
    assert!(
        opened > 0,
        "no damaged copy opened: the test damages too much"
    );
}
