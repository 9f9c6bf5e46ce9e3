//! Dead letters: paging, redrive and purge.

use super::fixture::{LONG_LEASE, msg, open, receive_n, stats_of, submit_ok};
use super::{BackendFactory, test_config};
use crate::{NackOutcome, QueueBackend, QueueConfig, QueueError, Selection};
use bytes::Bytes;
use std::time::Duration;

/// Receives `n` messages of `q` and nacks each into the dead set (the queue allows one attempt).
async fn kill_all(b: &dyn QueueBackend, q: &str, n: usize) {
    let got = receive_n(b, q, "killer", n, LONG_LEASE, Duration::from_secs(5)).await;
    assert_eq!(got.len(), n);
    for m in got {
        let o = b.nack(&m.receipt, "fatal", None).await.expect("nack");
        assert_eq!(o, NackOutcome::DeadLettered);
    }
}

/// Dead letters page, redrive (fresh attempt count) and purge, by id or all.
pub async fn dead_letters_list_redrive_purge(factory: &dyn BackendFactory) {
    let config = test_config().with_queue(
        "dlq",
        QueueConfig {
            max_attempts: 1,
            ..test_config().defaults
        },
    );
    let b = open(factory, config).await;
    let q = "dlq";
    submit_ok(&*b, q, (0..5).map(|i| msg(&format!("d{i}"))).collect()).await;
    kill_all(&*b, q, 5).await;
    assert_eq!(stats_of(&*b, q).await.dead_letters, 5);

    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let (page, next) = b
            .list_dead_letters(q, 2, token.as_deref())
            .await
            .expect("list");
        pages += 1;
        assert!(page.len() <= 2);
        for d in &page {
            assert_eq!(d.last_error, "fatal");
            assert_eq!(d.attempts.len(), 1);
            ids.push(d.message_id.clone());
        }
        match next {
            Some(t) => token = Some(t),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["d0", "d1", "d2", "d3", "d4"]);

    let n = b
        .redrive(
            q,
            Selection::Ids(vec!["d1".into(), "d3".into(), "nope".into()]),
        )
        .await
        .expect("redrive");
    assert_eq!(n, 2);
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.dead_letters), (2, 3));
    let back = receive_n(&*b, q, "c", 2, LONG_LEASE, Duration::from_secs(5)).await;
    let mut back_ids: Vec<&str> = back.iter().map(|m| m.message_id.as_str()).collect();
    back_ids.sort();
    assert_eq!(back_ids, vec!["d1", "d3"]);
    assert!(
        back.iter().all(|m| m.attempt == 1),
        "redrive must reset attempts"
    );
    assert_eq!(
        back[0].body,
        Bytes::from(format!("body of {}", back[0].message_id))
    );
    for m in back {
        b.ack(&m.receipt, None).await.expect("ack");
    }

    assert_eq!(
        b.purge(q, Selection::Ids(vec!["d0".into()]))
            .await
            .expect("purge"),
        1
    );
    assert_eq!(stats_of(&*b, q).await.dead_letters, 2);
    assert_eq!(b.redrive(q, Selection::All).await.expect("redrive"), 2);
    kill_all(&*b, q, 2).await;
    assert_eq!(b.purge(q, Selection::All).await.expect("purge"), 2);
    let s = stats_of(&*b, q).await;
    assert_eq!((s.depth, s.in_flight, s.dead_letters), (0, 0, 0));
    let (page, next) = b.list_dead_letters(q, 10, None).await.expect("list");
    assert!(page.is_empty() && next.is_none());
    assert!(matches!(
        b.list_dead_letters("never-used", 10, None).await,
        Err(QueueError::NotFound(_))
    ));
    assert!(matches!(
        b.redrive("never-used", Selection::All).await,
        Err(QueueError::NotFound(_))
    ));
}
