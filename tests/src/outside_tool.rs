//! Tools and servers that some tests need from outside the workspace.
//!
//! Such a test is marked `#[ignore = "needs AGENTMESH_TEST_<NAME>"]`, so a plain
//! `cargo nextest run` reports it as skipped; `.ci/run` sets every variable and runs
//! the ignored tests too. Run on its own without the variable, the test fails: it
//! never passes without having checked anything.

/// The value of `variable` (the path of a tool or the address of a server); panics
/// with what to set if it is missing. `what` says what the variable must name.
#[track_caller]
pub fn outside_tool(variable: &str, what: &str) -> String {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{variable} is not set: this test needs {what}. Set it, or run .ci/run, \
             which installs the tools, starts the servers and sets every AGENTMESH_TEST_* variable"
        ),
    }
}
