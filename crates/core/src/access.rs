//! Authorisation: which principals may do what to which agents, queues and traces.
//!
//! A policy is a list of rules, each granting `actions` on `resources` to `principals`. With
//! authentication off every call is allowed (the local first run); with it on, whatever no rule
//! grants is denied. Both faces reach the core through the router, the mesh and the queue
//! operations, which check here, so a gRPC call and its HTTP twin get the same answer.
//!
//! Patterns (principals and resources) match the whole string, `*` standing for any run of
//! characters: `*`, `billing-*`, `skill:translate`. A principal pattern `group:<name>` matches
//! a principal holding that group or role.

use std::sync::atomic::{AtomicU64, Ordering};

use agentmesh_proto::{CallContext, Principal};
use serde::{Deserialize, Serialize};

use crate::error::MeshError;

/// What a caller may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Invoke, stream to, converse with or fan out to an agent (`name` or `skill:<id>`).
    Call,
    /// Submit messages to a queue.
    Submit,
    /// Consume a queue and list its dead letters.
    Consume,
    /// Read a queued call's result by correlation id.
    ReadResults,
    /// Read the trace journal by correlation id.
    ReadTraces,
    /// Redrive a queue's dead letters.
    Redrive,
    /// Purge a queue's dead letters.
    Purge,
    /// Register, renew and deregister instances of an agent name.
    Register,
    /// Look up and watch agents (and list queues).
    Discover,
    /// Every action.
    #[serde(rename = "*")]
    Any,
}

impl Action {
    /// The action's name as written in the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Call => "call",
            Action::Submit => "submit",
            Action::Consume => "consume",
            Action::ReadResults => "read_results",
            Action::ReadTraces => "read_traces",
            Action::Redrive => "redrive",
            Action::Purge => "purge",
            Action::Register => "register",
            Action::Discover => "discover",
            Action::Any => "*",
        }
    }
}

/// One rule of the policy (`[[auth.policy]]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyRule {
    /// Principal ids or `group:<name>` patterns the rule applies to.
    pub principals: Vec<String>,
    /// Actions granted.
    pub actions: Vec<Action>,
    /// Resources they are granted on: agent names or `skill:<id>` (call, register, discover),
    /// queue names (submit, consume, redrive, purge), correlation ids (read_traces,
    /// read_results). Empty means `*`.
    pub resources: Vec<String>,
}

impl PolicyRule {
    fn grants(&self, principal: &Principal, action: Action, resource: &str) -> bool {
        self.actions
            .iter()
            .any(|a| *a == Action::Any || *a == action)
            && self
                .principals
                .iter()
                .any(|p| match p.strip_prefix("group:") {
                    Some(group) => principal.groups.iter().any(|g| matches(group, g)),
                    None => matches(p, &principal.id),
                })
            && (self.resources.is_empty() || self.resources.iter().any(|r| matches(r, resource)))
    }
}

/// The policy the node enforces, and how many calls it denied.
#[derive(Debug, Default)]
pub struct Access {
    enforced: bool,
    rules: Vec<PolicyRule>,
    denied: AtomicU64,
}

impl Access {
    /// No enforcement: every call is allowed (authentication off).
    pub fn open() -> Self {
        Self::default()
    }

    /// Enforces `rules`: denied unless a rule grants it.
    pub fn enforce(rules: Vec<PolicyRule>) -> Self {
        Self {
            enforced: true,
            rules,
            denied: AtomicU64::new(0),
        }
    }

    /// Whether the policy is enforced.
    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// Calls denied so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Whether `principal` may do `action` on `resource`.
    pub fn allows(&self, principal: Option<&Principal>, action: Action, resource: &str) -> bool {
        if !self.enforced {
            return true;
        }
        principal.is_some_and(|principal| {
            self.rules
                .iter()
                .any(|rule| rule.grants(principal, action, resource))
        })
    }

    /// Allows the call, or refuses it with PERMISSION_DENIED naming the action and resource
    /// (never the rules), logged with the correlation id and the principal.
    pub fn check(
        &self,
        call: &CallContext,
        action: Action,
        resource: &str,
    ) -> Result<(), MeshError> {
        if self.allows(call.principal.as_ref(), action, resource) {
            return Ok(());
        }
        self.denied.fetch_add(1, Ordering::Relaxed);
        let principal = call.principal.as_ref().map_or_else(
            || "an anonymous caller".to_owned(),
            |p| format!("'{}'", p.id),
        );
        tracing::warn!(
            correlation_id = %call.correlation_id,
            principal = %principal,
            action = action.as_str(),
            resource,
            "call denied by policy"
        );
        Err(MeshError::PermissionDenied {
            principal,
            action: action.as_str(),
            resource: resource.to_owned(),
        })
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
pub fn matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_strings() {
        assert!(matches("*", ""));
        assert!(matches("*", "echo"));
        assert!(matches("echo", "echo"));
        assert!(!matches("echo", "echo2"));
        assert!(matches("billing-*", "billing-eu"));
        assert!(!matches("billing-*", "xbilling-eu"));
        assert!(matches("*-eu", "billing-eu"));
        assert!(matches("a*b*c", "aXbYc"));
        assert!(!matches("a*b*c", "aXbY"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn denies_by_default_and_grants_by_rule() {
        let access = Access::enforce(vec![
            PolicyRule {
                principals: vec!["alice".into()],
                actions: vec![Action::Call],
                resources: vec!["echo".into(), "skill:*".into()],
            },
            PolicyRule {
                principals: vec!["group:ops".into()],
                actions: vec![Action::Any],
                resources: vec![],
            },
        ]);
        let alice = Principal::new("alice");
        let ops = Principal {
            id: "bob".into(),
            groups: vec!["ops".into()],
        };
        assert!(access.allows(Some(&alice), Action::Call, "echo"));
        assert!(access.allows(Some(&alice), Action::Call, "skill:x"));
        assert!(!access.allows(Some(&alice), Action::Call, "other"));
        assert!(!access.allows(Some(&alice), Action::Submit, "echo"));
        assert!(access.allows(Some(&ops), Action::Purge, "jobs"));
        assert!(!access.allows(None, Action::Call, "echo"));
        assert!(Access::open().allows(None, Action::Purge, "jobs"));
        let call = CallContext {
            principal: Some(alice),
            ..CallContext::new(&Default::default())
        };
        let denied = access.check(&call, Action::Submit, "jobs").unwrap_err();
        assert!(denied.to_string().contains("may not submit 'jobs'"));
        assert_eq!(access.denied(), 1);
    }
}
