//! Message chunks: the messages one batch appended to one queue, stored as one value.
//!
//! Storing a chunk instead of one entry per message makes a submit of many messages one
//! B-tree insert, and settling (ack or dead-letter) one bitmap update per chunk and batch; the
//! chunk is deleted when every message in it is settled. Layout (little-endian):
//!
//! ```text
//! u8 version | u32 count | u32 end offset of each record (count times) | records
//! ```
//!
//! Message `i` of the chunk stored under `(queue id, first)` has seq `first + i`.

use super::codec::Corrupt;

const CHUNK_V1: u8 = 1;
const HEADER: usize = 5;

/// Most messages in one chunk.
pub(crate) const MAX_CHUNK_MESSAGES: usize = 1024;
/// Largest encoded chunk, unless one message alone is larger (it then gets a chunk of its own).
/// Measured with `queue_throughput -- --depth`: 400k queued 1-KiB messages take a 544 MiB file
/// with 31 KiB chunks (as with one entry per message), but 784 MiB with 60 KiB chunks and
/// 1092 MiB with 256 KiB chunks, as redb rounds large values up to page runs.
pub(crate) const MAX_CHUNK_BYTES: usize = 31 * 1024;

/// Collects the records of a chunk being written.
pub(crate) struct ChunkBuilder {
    pub(crate) first: u64,
    ends: Vec<u32>,
    records: Vec<u8>,
}

impl ChunkBuilder {
    pub(crate) fn new(first: u64) -> Self {
        Self {
            first,
            ends: Vec::new(),
            records: Vec::new(),
        }
    }

    /// Seq the next record will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.first + self.ends.len() as u64
    }

    /// Whether `record_len` more bytes still fit (an empty chunk takes any record).
    pub(crate) fn fits(&self, record_len: usize) -> bool {
        self.ends.is_empty()
            || (self.ends.len() < MAX_CHUNK_MESSAGES
                && self.encoded_len() + 4 + record_len <= MAX_CHUNK_BYTES)
    }

    /// Appends a record; returns its seq.
    pub(crate) fn push(&mut self, record: &[u8]) -> u64 {
        self.push_with(|out| out.extend_from_slice(record))
    }

    /// Appends the record that `write` appends to the buffer; returns its seq.
    pub(crate) fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let seq = self.next_seq();
        write(&mut self.records);
        // Records are bounded by the API limits (4 MiB bodies), chunks by MAX_CHUNK_BYTES.
        self.ends
            .push(u32::try_from(self.records.len()).unwrap_or(u32::MAX));
        seq
    }

    fn encoded_len(&self) -> usize {
        HEADER + 4 * self.ends.len() + self.records.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(CHUNK_V1);
        out.extend_from_slice(&(self.ends.len() as u32).to_le_bytes());
        for end in &self.ends {
            out.extend_from_slice(&end.to_le_bytes());
        }
        out.extend_from_slice(&self.records);
        out
    }
}

/// A stored chunk, read in place.
pub(crate) struct ChunkView<'a> {
    buf: &'a [u8],
    count: usize,
}

impl<'a> ChunkView<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Result<Self, Corrupt> {
        if buf.first() != Some(&CHUNK_V1) {
            return Err(Corrupt("unknown chunk version"));
        }
        let count = u32::from_le_bytes(
            buf.get(1..HEADER)
                .and_then(|b| b.try_into().ok())
                .ok_or(Corrupt("truncated chunk header"))?,
        ) as usize;
        if buf.len() < HEADER + 4 * count {
            return Err(Corrupt("truncated chunk index"));
        }
        Ok(Self { buf, count })
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    fn end(&self, i: usize) -> usize {
        let at = HEADER + 4 * i;
        let b = &self.buf[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// The record of message `i`.
    pub(crate) fn record(&self, i: usize) -> Result<&'a [u8], Corrupt> {
        if i >= self.count {
            return Err(Corrupt("chunk index out of range"));
        }
        let data = HEADER + 4 * self.count;
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        let end = self.end(i);
        self.buf
            .get(data + start..data + end)
            .filter(|_| start <= end)
            .ok_or(Corrupt("chunk record out of bounds"))
    }
}

/// Which messages of a chunk are settled (acked or dead-lettered): `u32 count | bits`.
pub(crate) struct Settled {
    count: usize,
    bits: Vec<u8>,
}

impl Settled {
    pub(crate) fn none(count: usize) -> Self {
        Self {
            count,
            bits: vec![0; count.div_ceil(8)],
        }
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, Corrupt> {
        let count = u32::from_le_bytes(
            buf.get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(Corrupt("truncated settled bitmap"))?,
        ) as usize;
        let bits = buf[4..].to_vec();
        if bits.len() != count.div_ceil(8) {
            return Err(Corrupt("settled bitmap has the wrong length"));
        }
        Ok(Self { count, bits })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.bits.len());
        out.extend_from_slice(&(self.count as u32).to_le_bytes());
        out.extend_from_slice(&self.bits);
        out
    }

    pub(crate) fn contains(&self, i: usize) -> bool {
        i < self.count && self.bits[i / 8] & (1 << (i % 8)) != 0
    }

    pub(crate) fn insert(&mut self, i: usize) {
        if i < self.count {
            self.bits[i / 8] |= 1 << (i % 8);
        }
    }

    pub(crate) fn all(&self) -> bool {
        (0..self.count).all(|i| self.contains(i))
    }

    /// First unsettled message, if any.
    pub(crate) fn first_unsettled(&self) -> Option<usize> {
        (0..self.count).find(|&i| !self.contains(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_round_trip_and_limits() {
        let mut b = ChunkBuilder::new(10);
        assert!(b.is_empty() && b.fits(MAX_CHUNK_BYTES * 2));
        assert_eq!(b.push(b"one"), 10);
        assert_eq!(b.push(b""), 11);
        assert_eq!(b.push(b"three"), 12);
        assert!(!b.fits(MAX_CHUNK_BYTES));
        let buf = b.encode();
        let v = ChunkView::new(&buf).unwrap();
        assert_eq!(v.count(), 3);
        assert_eq!(v.record(0).unwrap(), b"one");
        assert_eq!(v.record(1).unwrap(), b"");
        assert_eq!(v.record(2).unwrap(), b"three");
        assert!(v.record(3).is_err());
        assert!(ChunkView::new(&buf[..6]).is_err());
        assert!(ChunkView::new(&[9, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn settled_bitmap() {
        let mut s = Settled::none(10);
        assert_eq!(s.first_unsettled(), Some(0));
        for i in 0..10 {
            assert!(!s.all());
            s.insert(i);
        }
        assert!(s.all() && s.first_unsettled().is_none());
        let mut s = Settled::none(9);
        s.insert(3);
        let d = Settled::decode(&s.encode()).unwrap();
        assert!(d.contains(3) && !d.contains(4) && !d.contains(20));
        assert!(Settled::decode(&[9, 0, 0, 0, 1]).is_err());
    }
}
