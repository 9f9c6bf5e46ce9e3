//! Fixtures for agentmesh's end-to-end tests, written once and shared by every
//! test file in `tests/` (one file per capability) and by the `agentmesh`
//! binary's own tests and benches.
//!
//! - [`node`]: [`TestNode`], a real node serving on `127.0.0.1:0` with a queue
//!   store of its own, stopped through its shutdown signal.
//! - [`agents`]: agent cards, small agents ([`Echo`], [`Controlled`], [`Streamer`])
//!   and starting them against a node.
//! - [`eventually`]: polling a condition until it holds or time runs out.
//! - [`http`]: an HTTP client and the gateway's error JSON.
//! - [`sse`]: a reader of Server-Sent Events over an HTTP response.
//! - [`queue`]: a node with quick queue timings, a raw `Consume` stream and the
//!   queue figures the tests wait for.
//! - [`process`]: a real `agentmesh serve` process, for the binary's own tests.
//! - [`guides`]: the guides in `docs/guides/` as tests: their shell snippets run
//!   against a node with their output checked, their Rust snippets checked against
//!   the compiled examples they come from.
//! - [`tls`]: certificates made at test time (a CA, server and client certificates), a
//!   node's TLS files and clients that trust them.
//! - [`outside_tool`]: the tool or server a test needs from outside, named by an
//!   `AGENTMESH_TEST_*` variable.

pub mod agents;
pub mod eventually;
pub mod guides;
pub mod http;
pub mod node;
pub mod outside_tool;
pub mod process;
pub mod queue;
pub mod sse;
pub mod tls;

pub use agents::{Controlled, Echo, Streamer, card, start_agent, start_agent_with_ttl};
pub use eventually::eventually;
pub use http::{expect_gateway_error, http_client};
pub use node::{TestNode, test_config};
pub use outside_tool::outside_tool;
pub use process::{NodeProcess, free_port};
pub use sse::{SseEvent, SseReader};
