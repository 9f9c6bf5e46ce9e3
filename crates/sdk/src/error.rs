//! The SDK's error type.

/// Everything the SDK itself can fail with (calls fail with `tonic::Status`).
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The node address is not a valid URI.
    #[error("invalid address {address}: {reason}")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A token cannot be sent as an `authorization` header.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// Binding or serving the agent's listener failed.
    #[error("agent server failed: {0}")]
    Serve(#[from] std::io::Error),
    /// The agent could not register with the node.
    #[error("registration failed: {0}")]
    Register(#[from] tonic::Status),
}
