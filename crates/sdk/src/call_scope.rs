//! The call the current task is handling, as outgoing calls need it: its context and the id
//! of the message being handled. [`Context::scope`](crate::Context::scope) sets it; the
//! client reads it, so calls made while handling a message inherit its chain and deadline
//! without the author passing anything along.

use agentmesh_proto::CallContext;

tokio::task_local! {
    static CURRENT: CallScope;
}

/// What a call made from inside a handler inherits.
#[derive(Debug, Clone)]
pub(crate) struct CallScope {
    /// The handled call's context.
    pub(crate) call: CallContext,
    /// The handled message (the causation id of what is sent).
    pub(crate) message_id: String,
}

/// The scope of the call the current task is handling, if any.
pub(crate) fn current() -> Option<CallScope> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `future` inside `scope`.
pub(crate) async fn enter<F: Future>(scope: CallScope, future: F) -> F::Output {
    CURRENT.scope(scope, future).await
}
