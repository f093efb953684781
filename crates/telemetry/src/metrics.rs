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
    /// Metric name → its kind, help and series.
    families: BTreeMap<&'static str, Family>,
}

#[derive(Debug)]
struct Family {
    kind: Kind,
    help: &'static str,
    /// Rendered labels → value.
    series: BTreeMap<String, Value>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

thread_local! {
    /// Where a call's labels are rendered: counting a message allocates
    /// nothing once its series exists (this runs for every message).
    static LABELS: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Finds (or makes, from `init`) the series of `name` with `labels` and
/// hands it to `f`.
fn update(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &[(&str, &str)],
    init: fn() -> Value,
    f: impl FnOnce(&mut Value),
) {
    LABELS.with_borrow_mut(|rendered| {
        rendered.clear();
        render_labels(rendered, labels);
        // A panic elsewhere while holding the lock leaves plain numbers
        // behind: still good to read and to add to.
        let mut r = REGISTRY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let family = r.families.entry(name).or_insert_with(|| Family {
            kind,
            help,
            series: BTreeMap::new(),
        });
        match family.series.get_mut(rendered.as_str()) {
            Some(v) => f(v),
            None => {
                let mut v = init();
                f(&mut v);
                family.series.insert(rendered.clone(), v);
            }
        }
    });
}

/// `{a="x",b="y"}` with values escaped as the format asks, appended to `out`.
fn render_labels(out: &mut String, labels: &[(&str, &str)]) {
    for (i, (k, v)) in labels.iter().enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    if !labels.is_empty() {
        out.push('}');
    }
}

fn number() -> Value {
    Value::Number(0.0)
}

fn histogram() -> Value {
    Value::Histogram {
        counts: [0; LATENCY_BUCKETS.len()],
        count: 0,
        sum: 0.0,
    }
}

/// Adds `by` to a counter.
pub fn add(name: &'static str, help: &'static str, labels: &[(&str, &str)], by: u64) {
    update(name, Kind::Counter, help, labels, number, |v| {
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
    update(name, Kind::Gauge, help, labels, number, |v| {
        *v = Value::Number(value);
    });
}

/// Records one observation (seconds) in a latency histogram.
pub fn observe(name: &'static str, help: &'static str, labels: &[(&str, &str)], seconds: f64) {
    update(name, Kind::Histogram, help, labels, histogram, |v| {
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
    let r = REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = String::new();
    for (name, Family { kind, help, series }) in &r.families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {}", kind.name());
        for (labels, value) in series {
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
                        let _ = writeln!(out, "{name}_bucket{} {c}", with_le(&bound.to_string()));
                    }
                    let _ = writeln!(out, "{name}_bucket{} {count}", with_le("+Inf"));
                    let _ = writeln!(out, "{name}_sum{labels} {sum}");
                    let _ = writeln!(out, "{name}_count{labels} {count}");
                }
            }
        }
    }
    out
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
