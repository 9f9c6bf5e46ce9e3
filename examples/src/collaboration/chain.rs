//! The chain of a collaboration as it happens: every actor records the numbered steps it
//! sees (who → whom, in which style, under which correlation id), and the chain prints
//! each one at once, timed from the start of the run.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// One step of the chain, as the actor that saw it recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Which of the nine steps of the collaboration this is (1–9).
    pub number: u8,
    /// Who sent.
    pub from: String,
    /// Who received.
    pub to: String,
    /// The interaction style, e.g. `fan-out (best effort)`.
    pub style: &'static str,
    /// Time since the run started.
    pub at: Duration,
    /// The correlation id the recording actor saw on the message (not the one it expected).
    pub correlation_id: String,
    /// What happened, in a few words.
    pub detail: String,
}

impl Step {
    /// The column titles of the printed steps, aligned with them.
    pub fn header() -> String {
        format!(
            "{:>2}  {:>9}  {:<28} {:<30} what",
            "#", "time", "from → to", "style"
        )
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = format!("{} → {}", self.from, self.to);
        write!(
            f,
            "{:>2}  {:>6} ms  {route:<28} {:<30} {}",
            self.number,
            self.at.as_millis(),
            self.style,
            self.detail
        )
    }
}

/// The steps of one run, shared by every actor; clones record into the same chain.
#[derive(Debug, Clone)]
pub struct Chain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    print: bool,
    steps: Mutex<Vec<Step>>,
}

impl Chain {
    /// A chain that starts now; with `print`, each step and note goes to stdout as it
    /// is recorded.
    pub fn new(print: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                started: Instant::now(),
                print,
                steps: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Records step `number`, seen under `correlation_id`.
    pub(crate) fn record(
        &self,
        number: u8,
        (from, to): (&str, &str),
        style: &'static str,
        correlation_id: &str,
        detail: impl Into<String>,
    ) {
        let step = Step {
            number,
            from: from.to_owned(),
            to: to.to_owned(),
            style,
            at: self.inner.started.elapsed(),
            correlation_id: correlation_id.to_owned(),
            detail: detail.into(),
        };
        let mut steps = self
            .inner
            .steps
            .lock()
            .expect("no actor panics while recording");
        // Printed under the lock, so the output is in recording order.
        if self.inner.print {
            println!("{step}");
        }
        steps.push(step);
    }

    /// Prints a line that is not a step (e.g. a worker being killed).
    pub(crate) fn note(&self, text: impl fmt::Display) {
        let _steps = self
            .inner
            .steps
            .lock()
            .expect("no actor panics while recording");
        if self.inner.print {
            println!(
                "--  {:>6} ms  {text}",
                self.inner.started.elapsed().as_millis()
            );
        }
    }

    /// The steps so far, in the order they were recorded.
    pub fn steps(&self) -> Vec<Step> {
        self.inner
            .steps
            .lock()
            .expect("no actor panics while recording")
            .clone()
    }
}
