//! External A2A agents on the mesh: listed by card URL, called through the router.
//!
//! - [`agents`]: adding them, listing them with their skills, refreshing their cards;
//! - [`transport`]: the router's transport to them (`Invoke` → `SendMessage`, `Stream` →
//!   `SendStreamingMessage`) and their failures as gRPC codes;
//! - [`mapping`]: envelopes ↔ A2A messages and parts.

pub mod agents;
pub mod mapping;
pub mod transport;

pub use agents::{ExternalAgent, ExternalAgents, ExternalAgentsConfig, mesh_card};
pub use transport::{A2aTransport, BINDING_KEY, CARD_URL_KEY};
