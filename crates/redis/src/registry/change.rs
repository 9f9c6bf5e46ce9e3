//! The registry's two encodings: the record Redis keeps per instance, and the change
//! announced on the channel. Both start with a few space-separated text fields the Lua
//! scripts can read (`string.match`), followed by the bytes they never look into.
//!
//! - record: `<lease id> <ttl ms> <registered at, unix ms> <AgentCard protobuf>`
//! - change: `<kind> <version> <ms left on the lease> <record>`, where kind is `A` (added),
//!   `U` (re-registered), `D` (deregistered) or `E` (expired); or, for a heartbeat,
//!   `R <version> <ms left> <instance id>`.

use std::time::{Duration, SystemTime};

use agentmesh_proto::v1::AgentCard;
use prost::Message;

/// What Redis keeps for one instance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub(crate) lease_id: String,
    pub(crate) ttl: Duration,
    pub(crate) registered_at: SystemTime,
    pub(crate) card: AgentCard,
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let registered_ms = self
            .registered_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let mut bytes = format!(
            "{} {} {} ",
            self.lease_id,
            self.ttl.as_millis(),
            registered_ms
        )
        .into_bytes();
        self.card.encode(&mut bytes).expect("a Vec grows as needed");
        bytes
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let [lease_id, ttl, registered, card] = fields(bytes)?;
        Some(Self {
            lease_id: text(lease_id)?.to_owned(),
            ttl: Duration::from_millis(number(ttl)?),
            registered_at: SystemTime::UNIX_EPOCH + Duration::from_millis(number(registered)?),
            card: AgentCard::decode(card).ok()?,
        })
    }
}

/// One announced change of the registry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// An instance registered (`updated`: it was registered before, under another lease).
    Put {
        version: u64,
        updated: bool,
        remaining: Duration,
        record: Record,
    },
    /// An instance left: deregistered, or its lease lapsed (`expired`).
    Remove {
        version: u64,
        expired: bool,
        record: Record,
    },
    /// A heartbeat renewed an instance's lease.
    Renew {
        version: u64,
        remaining: Duration,
        instance_id: String,
    },
}

impl Change {
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let [kind, version, remaining, rest] = fields(bytes)?;
        let version = number(version)?;
        let remaining = Duration::from_millis(number(remaining)?);
        Some(match kind {
            b"A" | b"U" => Change::Put {
                version,
                updated: kind == b"U",
                remaining,
                record: Record::decode(rest)?,
            },
            b"D" | b"E" => Change::Remove {
                version,
                expired: kind == b"E",
                record: Record::decode(rest)?,
            },
            b"R" => Change::Renew {
                version,
                remaining,
                instance_id: text(rest)?.to_owned(),
            },
            _ => return None,
        })
    }

    /// The change's number: one more than the change before it.
    pub(crate) fn version(&self) -> u64 {
        match self {
            Change::Put { version, .. }
            | Change::Remove { version, .. }
            | Change::Renew { version, .. } => *version,
        }
    }

    /// The instance changed.
    pub(crate) fn instance_id(&self) -> &str {
        match self {
            Change::Put { record, .. } | Change::Remove { record, .. } => &record.card.instance_id,
            Change::Renew { instance_id, .. } => instance_id,
        }
    }
}

/// Three space-terminated fields and the rest.
fn fields(bytes: &[u8]) -> Option<[&[u8]; 4]> {
    let mut parts = bytes.splitn(4, |byte| *byte == b' ');
    Some([parts.next()?, parts.next()?, parts.next()?, parts.next()?])
}

fn text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn number(bytes: &[u8]) -> Option<u64> {
    text(bytes)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            lease_id: "0190-lease".into(),
            ttl: Duration::from_millis(1500),
            registered_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_733_000_000_123),
            card: AgentCard {
                name: "echo".into(),
                // Spaces in an instance id stay inside the card's bytes.
                instance_id: "echo 1".into(),
                endpoint: "http://127.0.0.1:9000".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_record_reads_back_and_starts_with_its_lease() {
        let bytes = record().encode();
        assert!(bytes.starts_with(b"0190-lease 1500 1733000000123 "));
        assert_eq!(Record::decode(&bytes), Some(record()));
    }

    #[test]
    fn changes_read_back_as_the_scripts_write_them() {
        let mut added = b"A 7 1500 ".to_vec();
        added.extend(record().encode());
        assert_eq!(
            Change::decode(&added),
            Some(Change::Put {
                version: 7,
                updated: false,
                remaining: Duration::from_millis(1500),
                record: record(),
            })
        );
        let mut expired = b"E 9 0 ".to_vec();
        expired.extend(record().encode());
        let change = Change::decode(&expired).unwrap();
        assert!(matches!(change, Change::Remove { expired: true, .. }));
        assert_eq!(change.instance_id(), "echo 1");
        assert_eq!(
            Change::decode(b"R 8 1499 echo 1"),
            Some(Change::Renew {
                version: 8,
                remaining: Duration::from_millis(1499),
                instance_id: "echo 1".into(),
            })
        );
        assert_eq!(Change::decode(b"X 1 0 whatever"), None);
        assert_eq!(Change::decode(b"A 1"), None);
    }
}
