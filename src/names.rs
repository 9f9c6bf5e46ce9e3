//! The one rule for the names callers choose: agents, skills and queues. A name is 1 to
//! [`MAX_NAME_CHARS`] characters of `A-Z a-z 0-9 . _ -`, not starting with `.` (so never `.`,
//! `..` or a hidden file's name), which keeps names safe in URLs, Redis keys, metric labels and
//! logs. Errors quote at most [`QUOTED_CHARS`] characters of the name, so a huge input is
//! never echoed back.

/// Longest name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Most characters of a refused name quoted in the error.
pub const QUOTED_CHARS: usize = 40;

/// Checks `name` against the rule; `kind` says what it names ("agent name", "queue name").
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} is empty"));
    }
    let problem = if name.len() > MAX_NAME_CHARS {
        format!(
            "is {} bytes long, the limit is {MAX_NAME_CHARS}",
            name.len()
        )
    } else if name.starts_with('.') {
        "starts with '.'".to_owned()
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("contains {c:?}")
    } else {
        return Ok(());
    };
    Err(format!(
        "{kind} {} {problem}: names are 1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ - and do not start with '.'",
        quoted(name)
    ))
}

/// `name` in quotes, cut to [`QUOTED_CHARS`] characters (with `…` when cut).
pub fn quoted(name: &str) -> String {
    match name.char_indices().nth(QUOTED_CHARS) {
        Some((end, _)) => format!("{:?}…", &name[..end]),
        None => format!("{name:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_rule() {
        for good in [
            "echo",
            "jobs.v1",
            "a",
            "A-b_c.9",
            &"x".repeat(MAX_NAME_CHARS),
        ] {
            assert_eq!(check_name("agent name", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            ".hidden",
            "a/b",
            "nul\0",
            "tab\t",
            "sp ace",
            "é",
            &"x".repeat(MAX_NAME_CHARS + 1),
        ] {
            assert!(check_name("agent name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_huge_name_is_not_echoed_back() {
        let error = check_name("agent name", &"y".repeat(100_000)).unwrap_err();
        assert!(error.len() < 300, "{}", error.len());
    }
}
