//! What the examples share with the tests: the collaboration, which
//! `examples/collaboration.rs` runs and the end-to-end tests check step by step.

pub mod collaboration;
