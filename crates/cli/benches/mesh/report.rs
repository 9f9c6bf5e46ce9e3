//! The run's results: a detail table per section and one line per target, printed as
//! Markdown tables (readable in a terminal, and what `docs/BENCHMARKS.md` holds).

use std::fmt::Write as _;

/// A table of one section's measurements.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub(crate) header: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        let rule: Vec<String> = self
            .header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" }.to_owned())
            .collect();
        out.push_str(&line(&rule));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// What a target asks of a measured figure.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// The ratio to the baseline is at most this.
    RatioAtMost(f64),
    /// The ratio to the baseline is at least this.
    RatioAtLeast(f64),
    /// The figure itself is at most this (in its unit).
    AtMost(f64),
}

/// One target: a figure, what it is compared with, and whether it holds.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub(crate) what: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    /// The baseline's name and figure, measured in the same run.
    pub(crate) baseline: Option<(String, f64)>,
    pub(crate) target: Target,
}

impl Check {
    pub(crate) fn ratio(
        what: impl Into<String>,
        value: f64,
        unit: &'static str,
        baseline: (impl Into<String>, f64),
        target: Target,
    ) -> Self {
        Self {
            what: what.into(),
            value,
            unit,
            baseline: Some((baseline.0.into(), baseline.1)),
            target,
        }
    }

    pub(crate) fn absolute(
        what: impl Into<String>,
        value: f64,
        unit: &'static str,
        at_most: f64,
    ) -> Self {
        Self {
            what: what.into(),
            value,
            unit,
            baseline: None,
            target: Target::AtMost(at_most),
        }
    }

    fn ratio_value(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, b)| self.value / b)
    }

    pub(crate) fn holds(&self) -> bool {
        match (self.target, self.ratio_value()) {
            (Target::RatioAtMost(t), Some(r)) => r <= t,
            (Target::RatioAtLeast(t), Some(r)) => r >= t,
            (Target::AtMost(t), _) => self.value <= t,
            _ => false,
        }
    }

    fn cells(&self) -> Vec<String> {
        let figure = |v: f64| format!("{} {}", number(v), self.unit);
        vec![
            self.what.clone(),
            figure(self.value),
            self.baseline.as_ref().map_or_else(
                || "–".to_owned(),
                |(name, v)| format!("{name}: {}", figure(*v)),
            ),
            self.ratio_value()
                .map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×")),
            match self.target {
                Target::RatioAtMost(t) => format!("≤ {t}×"),
                Target::RatioAtLeast(t) => format!("≥ {t}×"),
                Target::AtMost(t) => format!("≤ {}", figure(t)),
            },
            if self.holds() { "yes" } else { "**no**" }.to_owned(),
        ]
    }
}

/// A figure with as many decimals as it needs to be read.
pub(crate) fn number(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if magnitude >= 10.0 {
        format!("{v:.1}")
    } else if magnitude >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// One section's results.
#[derive(Debug)]
pub(crate) struct Section {
    pub(crate) title: &'static str,
    /// What was run, in a sentence or two.
    pub(crate) setup: String,
    pub(crate) tables: Vec<Table>,
    pub(crate) checks: Vec<Check>,
    /// Remarks printed under the tables (skipped comparisons, explanations).
    pub(crate) notes: Vec<String>,
}

impl Section {
    pub(crate) fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n{}\n\n", self.title, self.setup);
        for table in &self.tables {
            out.push_str(&table.markdown());
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// Every target of the run in one table.
pub(crate) fn targets(sections: &[Section]) -> Table {
    let mut table = Table::new(&[
        "target",
        "measured",
        "baseline (same run)",
        "ratio",
        "target",
        "met",
    ]);
    for check in sections.iter().flat_map(|s| &s.checks) {
        table.row(check.cells());
    }
    table
}
