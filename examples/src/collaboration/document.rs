//! What the collaboration works on: a short document in three parts, and the analysis each
//! worker makes of its part (word count and keywords).

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// One part of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// 1, 2, 3 …
    pub number: u32,
    /// The part's title.
    pub title: &'static str,
    /// The part's text.
    pub text: &'static str,
}

/// The document the coordinator splits among the workers.
pub fn document() -> Vec<Part> {
    vec![
        Part {
            number: 1,
            title: "Discovery",
            text: "Agents register a card with the node and renew their lease with \
                   heartbeats. The node routes every call to the least loaded agents \
                   that accept the payload, and agents find other agents by skill. \
                   A lease that lapses removes the instance.",
        },
        Part {
            number: 2,
            title: "Streams and conversations",
            text: "Agents stream progress to their callers, and a stream that is cut \
                   resumes without a gap. Agents converse when they negotiate: agents \
                   send at any time, heartbeats prove the peer is alive, and a silent \
                   peer ends the conversation. Callers and agents see every stream event once.",
        },
        Part {
            number: 3,
            title: "The durable queue",
            text: "The queue acknowledges a message once the message is on disk. \
                   Consumers lease each message, ack it with a result, and the result \
                   goes to the queue named by reply_to. A message that fails too often \
                   becomes a dead letter of the queue.",
        },
    ]
}

/// A keyword and how often the part uses it.
pub type Keyword = (String, u64);

/// Words of at least five letters that a part uses at least twice, most used first (ties
/// in alphabetical order), at most three.
pub(crate) fn keywords(text: &str) -> Vec<Keyword> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for word in words(text).filter(|w| w.chars().count() >= 5) {
        *counts.entry(word).or_default() += 1;
    }
    let mut ranked: Vec<Keyword> = counts.into_iter().filter(|(_, n)| *n >= 2).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(3);
    ranked
}

/// The words of `text`, in lower case.
pub(crate) fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// The keywords of the earlier part that the later part does not claim: a keyword both
/// use goes to the part that uses it more, and to the later part on a tie.
pub(crate) fn keep_after_consulting(
    mine: &[Keyword],
    theirs: &[Keyword],
) -> (Vec<Keyword>, Vec<String>) {
    let mut kept = Vec::new();
    let mut given_up = Vec::new();
    for (word, count) in mine {
        match theirs.iter().find(|(w, _)| w == word) {
            Some((_, their_count)) if their_count >= count => given_up.push(word.clone()),
            _ => kept.push((word.clone(), *count)),
        }
    }
    (kept, given_up)
}

/// Keywords as JSON: `[{"word": …, "count": …}]`.
pub(crate) fn keywords_json(keywords: &[Keyword]) -> Value {
    keywords
        .iter()
        .map(|(word, count)| json!({ "word": word, "count": count }))
        .collect()
}

/// Keywords from their JSON form (missing or malformed entries are skipped).
pub(crate) fn keywords_from_json(value: &Value) -> Vec<Keyword> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| Some((k["word"].as_str()?.to_owned(), k["count"].as_u64()?)))
        .collect()
}

/// `agents ×4, lease ×2`.
pub(crate) fn describe(keywords: &[Keyword]) -> String {
    if keywords.is_empty() {
        return "none".into();
    }
    keywords
        .iter()
        .map(|(word, count)| format!("{word} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_two_parts_share_a_keyword_that_the_second_part_keeps() {
        let parts = document();
        let first = keywords(parts[0].text);
        let second = keywords(parts[1].text);
        let (kept, given_up) = keep_after_consulting(&first, &second);
        assert_eq!(given_up, ["agents"], "{first:?} / {second:?}");
        assert!(!kept.is_empty());
    }

    #[test]
    fn keywords_round_trip_through_json() {
        let keywords = keywords(document()[2].text);
        assert_eq!(keywords_from_json(&keywords_json(&keywords)), keywords);
    }
}
