//! The embedded queue store opening a damaged file.
//!
//! Input: one mode byte, then
//! * odd mode: the whole file, as arbitrary bytes;
//! * even mode: patches over a real store (built once per process: messages ready, leased,
//!   acked with results, waiting for a retry, dead-lettered), each 5 bytes (offset as u32
//!   little-endian, modulo the file's length, then the byte written there); mode bit 1 also
//!   truncates the file at the first patch's offset.
//!
//! Properties: opening returns a store or an error, never panics or hangs (the run's
//! `-timeout` catches a hang); a store that opens reads its stats, drains what it holds
//! (each delivery acked or nacked) and serves a submit → receive → ack of a new message; a
//! failure on a damaged file is a `Storage` error, never a panic.
#![no_main]

use std::sync::{LazyLock, Once};
use std::time::Duration;

use agentmesh_queue::{
    BackendConfig, DATABASE_FILE, EmbeddedBackend, NewMessage, QueueBackend, QueueConfig,
    QueueError, SubmitFate,
};
use libfuzzer_sys::fuzz_target;

fn config() -> BackendConfig {
    BackendConfig::new(QueueConfig {
        max_attempts: 2,
        ..QueueConfig::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// A small store in every state a message can be in, closed cleanly, as bytes.
static TEMPLATE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedBackend::open(dir.path(), config()).expect("open");
    runtime().block_on(async {
        let lease = Duration::from_secs(60);
        let messages = (0..8)
            .map(|i| {
                NewMessage::new(format!("m{i}"), format!("body {i}"))
                    .with_idempotency_key(format!("key {i}"))
                    .with_reply_to("replies")
            })
            .collect();
        store.submit("work", messages).await.expect("submit");
        let got = store
            .receive("work", "c", 6, lease, Duration::ZERO)
            .await
            .expect("receive");
        store
            .ack(&got[0].receipt, Some("result 0".into()))
            .await
            .expect("ack");
        store.ack(&got[1].receipt, None).await.expect("ack");
        store
            .nack(&got[2].receipt, "later", Some(Duration::from_secs(3600)))
            .await
            .expect("nack");
        store
            .nack(&got[3].receipt, "now", Some(Duration::ZERO))
            .await
            .expect("nack");
        store
            .nack(&got[4].receipt, "once", Some(Duration::ZERO))
            .await
            .expect("nack");
        let again = store
            .receive("work", "c", 8, lease, Duration::ZERO)
            .await
            .expect("receive");
        for m in again.iter().filter(|m| m.attempt == 2) {
            store.nack(&m.receipt, "twice", None).await.expect("nack");
        }
        store
            .submit("other", vec![NewMessage::new("o1", "other body")])
            .await
            .expect("submit");
    });
    drop(store);
    std::fs::read(dir.path().join(DATABASE_FILE)).expect("read the store")
});

fn file_from(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return TEMPLATE.clone();
    };
    if mode % 2 == 1 {
        return rest.to_vec();
    }
    let mut file = TEMPLATE.clone();
    let len = file.len();
    let mut truncate = None;
    for patch in rest.chunks_exact(5) {
        let offset = u32::from_le_bytes([patch[0], patch[1], patch[2], patch[3]]) as usize % len;
        truncate.get_or_insert(offset);
        file[offset] = patch[4];
    }
    if mode & 2 != 0 {
        if let Some(at) = truncate {
            file.truncate(at);
        }
    }
    file
}

/// A failure a damaged store may answer with.
fn acceptable(error: &QueueError) -> bool {
    matches!(error, QueueError::Storage(_) | QueueError::LeaseLost(_))
}

async fn exercise(store: &EmbeddedBackend) {
    let lease = Duration::from_secs(60);
    let stats = match store.stats().await {
        Ok(stats) => stats,
        Err(e) => return assert!(acceptable(&e), "stats: {e:?}"),
    };
    // Drain what the store holds: every delivery is settled one way or the other.
    for queue in &stats {
        // A damaged name is listed as the file holds it, but no request can name it: the API
        // refuses invalid queue names (and does, with InvalidArgument).
        if agentmesh_queue::validate_queue_name(&queue.name).is_err() {
            continue;
        }
        for round in 0..4 {
            let got = match store
                .receive(&queue.name, "fuzz", 64, lease, Duration::ZERO)
                .await
            {
                Ok(got) => got,
                Err(e) => return assert!(acceptable(&e), "receive: {e:?}"),
            };
            if got.is_empty() {
                break;
            }
            for m in got {
                let settled = if round % 2 == 0 {
                    store.ack(&m.receipt, None).await.map(drop)
                } else {
                    store.nack(&m.receipt, "fuzz", None).await.map(drop)
                };
                if let Err(e) = settled {
                    return assert!(acceptable(&e), "settle: {e:?}");
                }
            }
        }
        if let Err(e) = store.list_dead_letters(&queue.name, 100, None).await {
            assert!(acceptable(&e), "dead letters: {e:?}");
        }
    }
    // A new message goes through.
    let probe = NewMessage::new("probe", "probe body").with_idempotency_key("probe key");
    match store.submit("fuzz-probe", vec![probe]).await {
        Ok(fates) => assert!(
            matches!(
                fates.as_slice(),
                [SubmitFate::Accepted { .. }] | [SubmitFate::Duplicate { .. }]
            ),
            "{fates:?}"
        ),
        Err(e) => return assert!(acceptable(&e), "submit: {e:?}"),
    }
    match store
        .receive("fuzz-probe", "fuzz", 1, lease, Duration::from_secs(5))
        .await
    {
        Ok(got) => {
            let [m] = got.as_slice() else {
                panic!("the accepted probe was not delivered: {got:?}");
            };
            assert_eq!(&m.body[..], b"probe body");
            if let Err(e) = store.ack(&m.receipt, Some("done".into())).await {
                assert!(acceptable(&e), "ack: {e:?}");
            }
        }
        Err(e) => assert!(acceptable(&e), "receive: {e:?}"),
    }
}

/// redb panics on some damaged files, and the store contains those panics (turning them
/// into `Storage` errors), but libFuzzer's hook would abort on them first: skip the hook for
/// them. A panic the store did not contain still shows up: as a dead writer thread (`Closed`)
/// or a failed request, which the checks above reject.
fn contained_panics_are_not_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("/redb-")) {
                fuzzer_hook(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    contained_panics_are_not_crashes();
    let file = file_from(data);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(DATABASE_FILE), &file).expect("write the store");
    match EmbeddedBackend::open(dir.path(), config()) {
        Ok(store) => {
            runtime().block_on(exercise(&store));
            store.close();
        }
        Err(e) => assert!(acceptable(&e), "open failed with {e:?}"),
    }
});
