//! Numbers and tables: percentiles of latency samples, medians across repeated runs,
//! and the Markdown tables every workload prints.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch. Every process of a run (harness, workers) is on
/// the same machine, so these timestamps can be compared across processes.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The `p`-th percentile (0–100) of `samples`, nearest-rank; `None` when empty.
/// Sorts `samples` in place.
pub fn percentile(samples: &mut [u32], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    let index = rank.clamp(1, samples.len()) - 1;
    Some(f64::from(samples[index]))
}

/// p50, p99 and max of microsecond samples, in milliseconds.
pub fn latency_ms(samples: &mut [u32]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let p50 = percentile(samples, 50.0).map(|v| v / 1000.0);
    let p99 = percentile(samples, 99.0).map(|v| v / 1000.0);
    let max = samples.last().map(|v| f64::from(*v) / 1000.0);
    (p50, p99, max)
}

/// The median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// One cell of a result table.
#[derive(Debug, Clone)]
pub enum Cell {
    /// A measured number, printed with this many decimals. Repeated runs are merged
    /// by taking the median.
    Num(f64, usize),
    /// Not measured, with the reason (printed as `n/a (reason)`).
    Na(String),
    /// Free text (taken from the first run).
    Text(String),
}

impl Cell {
    /// A number, or `n/a (reason)` when absent.
    pub fn num_or(value: Option<f64>, decimals: usize, reason: &str) -> Cell {
        match value {
            Some(v) if v.is_finite() => Cell::Num(v, decimals),
            _ => Cell::Na(reason.to_owned()),
        }
    }

    /// The number, if this cell holds one.
    pub fn value(&self) -> Option<f64> {
        match self {
            Cell::Num(v, _) => Some(*v),
            _ => None,
        }
    }

    fn render(&self) -> String {
        match self {
            Cell::Num(v, d) => format!("{v:.*}", d),
            Cell::Na(reason) if reason.is_empty() => "n/a".into(),
            Cell::Na(reason) => format!("n/a ({reason})"),
            Cell::Text(t) => t.clone(),
        }
    }
}

/// The cells of one run of one configuration, by column name.
pub type Row = Vec<(String, Cell)>;

/// Merges repeated runs of the same configuration: the median of every numeric
/// column (over the runs where it was a number), the first run's text otherwise.
pub fn merge_repeats(runs: &[Row]) -> Row {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(name, cell)| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|row| row.iter().find(|(n, _)| n == name))
                .filter_map(|(_, c)| c.value())
                .collect();
            let merged = match (cell, median(&values)) {
                (Cell::Num(_, d), Some(m)) => Cell::Num(m, *d),
                (_, Some(m)) if !matches!(cell, Cell::Text(_)) => Cell::Num(m, 2),
                _ => cell.clone(),
            };
            (name.clone(), merged)
        })
        .collect()
}

/// A Markdown table under a heading, with notes after it.
#[derive(Debug, Default)]
pub struct Table {
    /// The heading (`### ...`).
    pub title: String,
    /// Column names, in order; taken from the first row when empty.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<Row>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    /// An empty table titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }

    /// Renders the table as Markdown.
    pub fn render(&self) -> String {
        let mut columns = self.columns.clone();
        for row in &self.rows {
            for (name, _) in row {
                if !columns.contains(name) {
                    columns.push(name.clone());
                }
            }
        }
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&format!("| {} |\n", columns.join(" | ")));
        out.push_str(&format!(
            "|{}\n",
            columns.iter().map(|_| " --- |").collect::<String>()
        ));
        for row in &self.rows {
            let cells: BTreeMap<&str, String> =
                row.iter().map(|(n, c)| (n.as_str(), c.render())).collect();
            let line: Vec<String> = columns
                .iter()
                .map(|c| cells.get(c.as_str()).cloned().unwrap_or_else(|| "-".into()))
                .collect();
            out.push_str(&format!("| {} |\n", line.join(" | ")));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                out.push_str(note);
                out.push('\n');
            }
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn medians_merge_repeats() {
        let runs = vec![
            vec![("x".to_owned(), Cell::Num(1.0, 1))],
            vec![("x".to_owned(), Cell::Num(5.0, 1))],
            vec![("x".to_owned(), Cell::Num(3.0, 1))],
        ];
        let merged = merge_repeats(&runs);
        assert_eq!(merged[0].1.value(), Some(3.0));
    }
}
