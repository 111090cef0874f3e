//! The table: one row per figure with the median of the runs, their spread, the target and
//! whether it was met; then notes (machine, load, breakdowns).

use std::fmt::Write;

use crate::stats::{median, spread};

/// A goal a figure should meet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// The median must be at least this.
    AtLeast(f64),
    /// The median must be at most this.
    AtMost(f64),
    /// The median must be below this.
    Below(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Self::AtLeast(t) => value >= t,
            Self::AtMost(t) => value <= t,
            Self::Below(t) => value < t,
        }
    }

    fn describe(self) -> String {
        match self {
            Self::AtLeast(t) => format!("≥ {}", number(t)),
            Self::AtMost(t) => format!("≤ {}", number(t)),
            Self::Below(t) => format!("< {}", number(t)),
        }
    }
}

/// One row.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What it is, e.g. `Q1 throughput`.
    pub name: String,
    /// Its unit, e.g. `tasks/s`.
    pub unit: &'static str,
    /// One value per run.
    pub runs: Vec<f64>,
    /// Its goal, if it has one.
    pub target: Option<Target>,
}

impl Figure {
    /// The median of the runs.
    pub fn median(&self) -> f64 {
        median(&self.runs)
    }
}

/// Everything a bench run printed.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Lines above the table (machine, mode, command).
    pub header: Vec<String>,
    /// The rows.
    pub figures: Vec<Figure>,
    /// Titled blocks below the table (load, breakdowns, skipped benchmarks).
    pub notes: Vec<(String, Vec<String>)>,
}

impl Report {
    /// Adds a row.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        unit: &'static str,
        runs: Vec<f64>,
        target: Option<Target>,
    ) {
        self.figures.push(Figure {
            name: name.into(),
            unit,
            runs,
            target,
        });
    }

    /// Adds a titled block of lines.
    pub fn note(&mut self, title: impl Into<String>, lines: Vec<String>) {
        self.notes.push((title.into(), lines));
    }

    /// The row named `name`.
    pub fn figure(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }

    /// The report as Markdown: header lines, the table, the notes.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.header {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out);
        let rows: Vec<[String; 6]> = self
            .figures
            .iter()
            .map(|f| {
                let m = f.median();
                let (lo, hi) = spread(&f.runs);
                let spread = if f.runs.len() > 1 {
                    format!("{} – {}", number(lo), number(hi))
                } else {
                    "(1 run)".into()
                };
                [
                    f.name.clone(),
                    format!("{} {}", number(m), f.unit),
                    spread,
                    f.runs.len().to_string(),
                    f.target.map(Target::describe).unwrap_or_default(),
                    match f.target {
                        Some(t) if t.met(m) => "met".into(),
                        Some(_) => "**missed**".into(),
                        None => String::new(),
                    },
                ]
            })
            .collect();
        let titles = [
            "figure",
            "median",
            "spread (min – max)",
            "runs",
            "target",
            "",
        ];
        let mut widths = titles.map(|t| t.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        let _ = writeln!(out, "{}", line(&titles.map(String::from)));
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let _ = writeln!(out, "{}", line(&dashes));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row));
        }
        for (title, lines) in &self.notes {
            let _ = writeln!(out, "\n{title}");
            for l in lines {
                let _ = writeln!(out, "  {l}");
            }
        }
        out
    }
}

/// A number for the table: thousands separated above 100, else three significant digits.
pub fn number(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    if x.abs() >= 100.0 {
        let n = x.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        return if n < 0 {
            format!("-{grouped}")
        } else {
            grouped
        };
    }
    if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(20_345.6), "20,346");
        assert_eq!(number(-1234.0), "-1,234");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(0.1234), "0.12");
        assert_eq!(number(f64::NAN), "n/a");
    }

    #[test]
    fn the_table_shows_median_spread_and_verdict() {
        let mut r = Report::default();
        r.add(
            "Q1 throughput",
            "tasks/s",
            vec![900.0, 1_100.0, 1_000.0],
            Some(Target::AtLeast(10_000.0)),
        );
        r.add("Q2 p50", "ms", vec![0.5], Some(Target::AtMost(1.0)));
        let text = r.render();
        assert!(text.contains("| Q1 throughput | 1,000 tasks/s"), "{text}");
        assert!(text.contains("900 – 1,100"), "{text}");
        assert!(text.contains("**missed**"), "{text}");
        assert!(text.contains("(1 run)"), "{text}");
        assert!(text.contains("| met"), "{text}");
    }
}
