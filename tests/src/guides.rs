//! The guides in `docs/guides/` as tests: their shell snippets are run against a node and
//! their output checked, and their Rust snippets are checked to be excerpts of compiled
//! examples, so the guides cannot drift from what agentmesh does.
//!
//! The markdown conventions (also explained in `docs/guides/README.md`):
//!
//! - A fenced ```` ```sh ```` block says what happens to it in its info string:
//!   `run=TOOL` (run with `bash` by the test for `TOOL`, `grpcurl` or `curl`) or `no-run`
//!   (set-up a reader does by hand, such as starting the node). A `sh` block that says
//!   neither is an error, so no snippet escapes the test by accident.
//! - `exit=N` on a `run` block: the exit status it must end with (default 0).
//! - A ```` ```text output ```` block right after a `run` block is its expected output
//!   (stdout and stderr together): each of its lines must appear in the output, in that
//!   order, with `...` standing for anything; output lines it does not show are allowed.
//! - A ```` ```rust excerpt=PATH ```` block must be a run of consecutive lines of `PATH`
//!   (a compiled example), leading whitespace aside. A `rust` block without it is an error.
//!
//! Snippets address the node through `$MESH` (`host:port`, for grpcurl) and `$HTTP`
//! (`http://host:port`, for curl), which the test sets.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{io::AsyncReadExt, process::Command};

/// A guide: its path and the snippets the test checks, in order.
#[derive(Debug, Clone)]
pub struct Guide {
    /// The markdown file.
    pub path: PathBuf,
    /// Shell snippets marked `run=TOOL`, in document order.
    pub shell: Vec<ShellSnippet>,
    /// Rust snippets, each an excerpt of a compiled file.
    pub rust: Vec<RustExcerpt>,
}

/// A shell snippet the test runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellSnippet {
    /// Line of the opening fence (1-based), for messages.
    pub line: usize,
    /// The tool the snippet shows (`run=TOOL`); the test for that tool runs it.
    pub tool: String,
    /// The script, run with `bash` under `set -euo pipefail`.
    pub script: String,
    /// The exit status it must end with.
    pub exit: i32,
    /// The expected output (the `text output` block after it), if any.
    pub expected: Option<String>,
}

/// A Rust snippet that must be an excerpt of a compiled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RustExcerpt {
    /// Line of the opening fence (1-based).
    pub line: usize,
    /// The file it comes from, relative to the repository root.
    pub file: String,
    /// The snippet's code.
    pub code: String,
}

/// One fenced block: its info string, its first line and its content.
struct Fence {
    info: Vec<String>,
    line: usize,
    body: String,
    /// Whether only blank lines separate it from the previous fence.
    follows_previous: bool,
}

fn fences(markdown: &str) -> Result<Vec<Fence>, String> {
    let mut fences = Vec::new();
    let mut lines = markdown.lines().enumerate();
    // Whether a fence closed and only blank lines came since.
    let mut right_after_fence = false;
    while let Some((index, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            right_after_fence &= line.trim().is_empty();
            continue;
        };
        let mut body = String::new();
        let mut closed = false;
        for (_, inner) in lines.by_ref() {
            if inner.trim_end() == "```" {
                closed = true;
                break;
            }
            body.push_str(inner);
            body.push('\n');
        }
        if !closed {
            return Err(format!("line {}: fence never closed", index + 1));
        }
        fences.push(Fence {
            info: info.split_whitespace().map(str::to_owned).collect(),
            line: index + 1,
            body,
            follows_previous: right_after_fence,
        });
        right_after_fence = true;
    }
    Ok(fences)
}

/// Parses a guide's markdown; `path` names it in errors.
pub fn parse(path: &Path, markdown: &str) -> Result<Guide, String> {
    let at = |line: usize| format!("{}:{line}", path.display());
    let mut guide = Guide {
        path: path.to_owned(),
        shell: Vec::new(),
        rust: Vec::new(),
    };
    // Whether the previous fence was a run=TOOL block (an output block must follow one).
    let mut previous_runs = false;
    for fence in fences(markdown).map_err(|e| format!("{}: {e}", path.display()))? {
        let runs = std::mem::take(&mut previous_runs);
        let lang = fence.info.first().map(String::as_str).unwrap_or("");
        let attributes = &fence.info[fence.info.len().min(1)..];
        match lang {
            "sh" | "bash" | "shell" => {
                let mut tool = None;
                let mut no_run = false;
                let mut exit = 0;
                for attribute in attributes {
                    if let Some(name) = attribute.strip_prefix("run=") {
                        tool = Some(name.to_owned());
                    } else if attribute == "no-run" {
                        no_run = true;
                    } else if let Some(status) = attribute.strip_prefix("exit=") {
                        exit = status.parse().map_err(|_| {
                            format!("{}: exit={status} is not a number", at(fence.line))
                        })?;
                    } else {
                        return Err(format!(
                            "{}: unknown attribute {attribute:?} (known: run=TOOL, no-run, exit=N)",
                            at(fence.line)
                        ));
                    }
                }
                match (tool, no_run) {
                    (Some(tool), false) => {
                        guide.shell.push(ShellSnippet {
                            line: fence.line,
                            tool,
                            script: fence.body,
                            exit,
                            expected: None,
                        });
                        previous_runs = true;
                    }
                    (None, true) => {}
                    _ => {
                        return Err(format!(
                            "{}: a shell block says run=TOOL (the test runs it) or no-run, exactly one",
                            at(fence.line)
                        ));
                    }
                }
            }
            "text" if attributes.iter().any(|a| a == "output") => {
                let Some(snippet) = guide
                    .shell
                    .last_mut()
                    .filter(|_| runs && fence.follows_previous)
                else {
                    return Err(format!(
                        "{}: an output block must follow its run=TOOL block directly",
                        at(fence.line)
                    ));
                };
                snippet.expected = Some(fence.body);
            }
            "rust" => {
                let file = attributes
                    .iter()
                    .find_map(|a| a.strip_prefix("excerpt="))
                    .ok_or_else(|| {
                        format!(
                            "{}: a rust block names the compiled file it comes from: excerpt=PATH",
                            at(fence.line)
                        )
                    })?;
                guide.rust.push(RustExcerpt {
                    line: fence.line,
                    file: file.to_owned(),
                    code: fence.body,
                });
            }
            _ => {}
        }
    }
    Ok(guide)
}

/// Reads and parses `dir/name`.
pub fn read_guide(dir: &Path, name: &str) -> Guide {
    let path = dir.join(name);
    let markdown = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse(&path, &markdown).unwrap_or_else(|e| panic!("{e}"))
}

/// Checks that `excerpt` is a run of consecutive lines of its file under `root`,
/// leading and trailing whitespace of each line aside.
pub fn check_excerpt(root: &Path, excerpt: &RustExcerpt) -> Result<(), String> {
    let path = root.join(&excerpt.file);
    let source = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: Vec<&str> = source.lines().map(str::trim).collect();
    let snippet: Vec<&str> = excerpt.code.lines().map(str::trim).collect();
    if snippet.is_empty() {
        return Err("the excerpt is empty".into());
    }
    if file.windows(snippet.len()).any(|window| window == snippet) {
        Ok(())
    } else {
        Err(format!(
            "the rust block at line {} is not a run of consecutive lines of {}; copy it from there again",
            excerpt.line, excerpt.file
        ))
    }
}

/// Checks `output` against an expected-output block: each non-empty expected line must
/// match an output line, in order, where `...` stands for anything.
pub fn check_output(expected: &str, output: &str) -> Result<(), String> {
    let mut lines = output.lines();
    for wanted in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !lines.by_ref().any(|line| line_matches(wanted, line)) {
            return Err(format!(
                "expected a line matching {wanted:?} (after the lines matched before it)"
            ));
        }
    }
    Ok(())
}

/// Whether `line` contains the pieces of `pattern` between its `...`s, in order.
fn line_matches(pattern: &str, line: &str) -> bool {
    let mut rest = line;
    for piece in pattern.split("...").filter(|p| !p.is_empty()) {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// How snippets are run: the variables they see and what is put on their `PATH`.
#[derive(Debug, Clone, Default)]
pub struct SnippetRunner {
    env: Vec<(String, String)>,
    path: Vec<PathBuf>,
    timeout: Option<Duration>,
}

impl SnippetRunner {
    /// A runner with no variables of its own and a 60 s limit per snippet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value` for every snippet.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// Puts the directory of the program `program` first on the snippets' `PATH`.
    pub fn program(mut self, program: &str) -> Self {
        let dir = Path::new(program)
            .parent()
            .unwrap_or_else(|| panic!("{program} is not a path to a program"));
        self.path.push(dir.to_owned());
        self
    }

    /// The limit on one snippet's run time.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs one snippet with `bash` and checks its exit status and output.
    pub async fn run(&self, snippet: &ShellSnippet) -> Result<String, String> {
        let system = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            self.path
                .iter()
                .cloned()
                .chain(std::env::split_paths(&system)),
        )
        .map_err(|e| format!("cannot build PATH: {e}"))?;
        // Errors show up where they happen; stderr goes in the output a reader would see.
        let script = format!("exec 2>&1\nset -euo pipefail\n{}", snippet.script);
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(&script)
            .env("PATH", path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group, so a snippet that times out is killed with its children.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start bash: {e}"))?;
        let pid = child.id();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let limit = self.timeout.unwrap_or(Duration::from_secs(60));
        let finished = tokio::time::timeout(limit, async {
            let mut output = Vec::new();
            stdout.read_to_end(&mut output).await?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, output))
        })
        .await;
        let (status, output) = match finished {
            Ok(result) => result.map_err(|e| format!("running the snippet: {e}"))?,
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pid}")])
                        .status();
                }
                return Err(format!("the snippet ran longer than {limit:?}"));
            }
        };
        let output = String::from_utf8_lossy(&output).into_owned();
        let code = status.code().unwrap_or(-1);
        if code != snippet.exit {
            return Err(format!(
                "exited with {code}, expected {}; output:\n{output}",
                snippet.exit
            ));
        }
        if let Some(expected) = &snippet.expected {
            check_output(expected, &output).map_err(|e| format!("{e}; output:\n{output}"))?;
        }
        Ok(output)
    }

    /// Runs every snippet of `guide` for `tool`, in order; panics naming each that failed.
    /// Panics as well if the guide has none for `tool` (a mistyped marker runs nothing).
    pub async fn run_guide(&self, guide: &Guide, tool: &str) {
        let snippets: Vec<&ShellSnippet> = guide.shell.iter().filter(|s| s.tool == tool).collect();
        assert!(
            !snippets.is_empty(),
            "{} has no run={tool} snippet",
            guide.path.display()
        );
        let mut failures = Vec::new();
        for snippet in snippets {
            if let Err(error) = self.run(snippet).await {
                failures.push(format!(
                    "{}:{}: {error}\nthe snippet:\n{}",
                    guide.path.display(),
                    snippet.line,
                    snippet.script
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snippet(script: &str, exit: i32, expected: Option<&str>) -> ShellSnippet {
        ShellSnippet {
            line: 1,
            tool: "curl".into(),
            script: script.into(),
            exit,
            expected: expected.map(str::to_owned),
        }
    }

    #[test]
    fn parses_run_blocks_outputs_and_excerpts() {
        let markdown = "# A guide\n\n```sh no-run\nagentmesh serve\n```\n\n\
            ```sh run=curl\ncurl -s $HTTP/healthz\n```\n\n```text output\nok\n```\n\n\
            ```sh run=grpcurl exit=69\ngrpcurl nowhere\n```\n\n\
            ```rust excerpt=examples/x.rs\nlet a = 1;\n```\n\n```json\n{}\n```\n";
        let guide = parse(Path::new("g.md"), markdown).unwrap();
        assert_eq!(guide.shell.len(), 2);
        assert_eq!(guide.shell[0].tool, "curl");
        assert_eq!(guide.shell[0].script, "curl -s $HTTP/healthz\n");
        assert_eq!(guide.shell[0].expected.as_deref(), Some("ok\n"));
        assert_eq!(guide.shell[1].exit, 69);
        assert_eq!(guide.shell[1].expected, None);
        assert_eq!(guide.rust[0].file, "examples/x.rs");
    }

    #[test]
    fn rejects_unmarked_shell_and_unsourced_rust_and_stray_output() {
        for markdown in [
            "```sh\ncurl x\n```\n",
            "```sh run=curl no-run\ncurl x\n```\n",
            "```sh run=curl wat\ncurl x\n```\n",
            "```rust\nfn main() {}\n```\n",
            "```text output\nok\n```\n",
            "```sh run=curl\ncurl x\n```\nsome prose\n```text output\nok\n```\n",
            "```sh run=curl\ncurl x\n```\n```sh no-run\nx\n```\n```text output\nok\n```\n",
            "```sh run=curl\ncurl x\n",
        ] {
            assert!(
                parse(Path::new("g.md"), markdown).is_err(),
                "accepted {markdown:?}"
            );
        }
    }

    #[test]
    fn output_lines_match_in_order_with_ellipses() {
        let output =
            "HTTP/1.1 200 OK\nx-correlation-id: abc\n\n{\"id\":\"1\",\"json\":{\"text\":\"hi\"}}\n";
        assert!(
            check_output(
                "HTTP/1.1 200 OK\n{\"id\":...\"json\":{\"text\":\"hi\"}...\n",
                output
            )
            .is_ok()
        );
        assert!(check_output("x-correlation-id: ...\n", output).is_ok());
        // Out of order, or a piece missing.
        assert!(check_output("{\"id\"\nHTTP/1.1 200 OK\n", output).is_err());
        assert!(check_output("{\"id\":...\"text\":\"bye\"\n", output).is_err());
    }

    #[test]
    fn excerpts_must_be_consecutive_lines_of_their_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("x.rs"),
            "fn main() {\n    let a = 1;\n    let b = 2;\n}\n",
        )
        .unwrap();
        let excerpt = |code: &str| RustExcerpt {
            line: 1,
            file: "x.rs".into(),
            code: code.into(),
        };
        assert!(check_excerpt(dir.path(), &excerpt("let a = 1;\nlet b = 2;\n")).is_ok());
        assert!(check_excerpt(dir.path(), &excerpt("let a = 1;\nlet b = 3;\n")).is_err());
        assert!(check_excerpt(dir.path(), &excerpt("let b = 2;\nlet a = 1;\n")).is_err());
    }

    #[tokio::test]
    async fn a_broken_snippet_fails() {
        let runner = SnippetRunner::new().env("GREETING", "hi");
        assert!(
            runner
                .run(&snippet("echo $GREETING", 0, Some("hi")))
                .await
                .is_ok()
        );
        // Wrong output, a failing command in the middle, a wrong exit status, an unset
        // variable, and a hang.
        assert!(
            runner
                .run(&snippet("echo $GREETING", 0, Some("bye")))
                .await
                .is_err()
        );
        assert!(
            runner
                .run(&snippet("false\necho hi", 0, Some("hi")))
                .await
                .is_err()
        );
        assert!(runner.run(&snippet("exit 3", 69, None)).await.is_err());
        assert!(runner.run(&snippet("exit 69", 69, None)).await.is_ok());
        assert!(
            runner
                .run(&snippet("echo $NOWHERE", 0, None))
                .await
                .is_err()
        );
        let quick = runner.clone().timeout(Duration::from_millis(200));
        assert!(
            quick
                .run(&snippet("sleep 5 & wait", 0, None))
                .await
                .is_err()
        );
    }
}
