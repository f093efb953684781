//! A process-wide registry of counters, gauges and histograms, rendered in
//! the Prometheus text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{LazyLock, Mutex};

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    Histogram {
        counts: [u64; LATENCY_BUCKETS.len()],
        count: u64,
        sum: f64,
    },
}

#[derive(Debug, Default)]
struct Registry {
    /// Metric name → (kind, help).
    families: BTreeMap<&'static str, (Kind, &'static str)>,
    /// (metric name, rendered labels) → value.
    series: BTreeMap<(&'static str, String), Value>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    // A panic elsewhere while holding the lock leaves plain numbers behind:
    // still good to read and to add to.
    let mut guard = REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&mut guard)
}

/// `{a="x",b="y"}` with values escaped as the format asks.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn family(r: &mut Registry, name: &'static str, kind: Kind, help: &'static str) {
    r.families.entry(name).or_insert((kind, help));
}

/// Adds `by` to a counter.
pub fn add(name: &'static str, help: &'static str, labels: &[(&str, &str)], by: u64) {
    with(|r| {
        family(r, name, Kind::Counter, help);
        let v = r
            .series
            .entry((name, render_labels(labels)))
            .or_insert(Value::Number(0.0));
        if let Value::Number(n) = v {
            *n += by as f64;
        }
    });
}

/// Adds one to a counter.
pub fn inc(name: &'static str, help: &'static str, labels: &[(&str, &str)]) {
    add(name, help, labels, 1);
}

/// Sets a gauge.
pub fn set(name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
    with(|r| {
        family(r, name, Kind::Gauge, help);
        r.series
            .insert((name, render_labels(labels)), Value::Number(value));
    });
}

/// Records one observation (seconds) in a latency histogram.
pub fn observe(name: &'static str, help: &'static str, labels: &[(&str, &str)], seconds: f64) {
    with(|r| {
        family(r, name, Kind::Histogram, help);
        let v = r
            .series
            .entry((name, render_labels(labels)))
            .or_insert(Value::Histogram {
                counts: [0; LATENCY_BUCKETS.len()],
                count: 0,
                sum: 0.0,
            });
        if let Value::Histogram { counts, count, sum } = v {
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                if seconds <= *bound {
                    counts[i] += 1;
                }
            }
            *count += 1;
            *sum += seconds;
        }
    });
}

/// Every series in the Prometheus text format.
pub fn render() -> String {
    with(|r| {
        let mut out = String::new();
        for (name, (kind, help)) in &r.families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {}", kind.name());
            for ((n, labels), value) in r.series.range((*name, String::new())..) {
                if n != name {
                    break;
                }
                match value {
                    Value::Number(v) => {
                        let _ = writeln!(out, "{name}{labels} {v}");
                    }
                    Value::Histogram { counts, count, sum } => {
                        let inner = labels.trim_start_matches('{').trim_end_matches('}');
                        let with_le = |le: &str| {
                            if inner.is_empty() {
                                format!("{{le=\"{le}\"}}")
                            } else {
                                format!("{{{inner},le=\"{le}\"}}")
                            }
                        };
                        for (bound, c) in LATENCY_BUCKETS.iter().zip(counts) {
                            let _ =
                                writeln!(out, "{name}_bucket{} {c}", with_le(&bound.to_string()));
                        }
                        let _ = writeln!(out, "{name}_bucket{} {count}", with_le("+Inf"));
                        let _ = writeln!(out, "{name}_sum{labels} {sum}");
                        let _ = writeln!(out, "{name}_count{labels} {count}");
                    }
                }
            }
        }
        out
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_as_prometheus_reads_them() {
        inc("t_events_total", "Events.", &[("kind", "a\"b")]);
        add("t_events_total", "Events.", &[("kind", "a\"b")], 2);
        set("t_lag", "Lag.", &[], 7.0);
        observe("t_latency_seconds", "Latency.", &[("r", "hr")], 0.003);
        observe("t_latency_seconds", "Latency.", &[("r", "hr")], 2.0);
        let text = render();
        assert!(text.contains("# TYPE t_events_total counter\n"), "{text}");
        assert!(
            text.contains("t_events_total{kind=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("t_lag 7\n"), "{text}");
        assert!(
            text.contains("t_latency_seconds_bucket{r=\"hr\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_bucket{r=\"hr\",le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_count{r=\"hr\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_seconds_sum{r=\"hr\"} 2.003\n"),
            "{text}"
        );
    }
}
