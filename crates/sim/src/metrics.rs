//! `/metrics` in the Prometheus text exposition format (0.0.4), with vLLM's
//! metric names and a `model_name` label.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::state::SimState;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Exposition {
    text: String,
    model_label: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, extra_labels: &str, value: f64) {
        let _ = writeln!(
            self.text,
            "{name}{{model_name=\"{}\"{extra_labels}}} {}",
            self.model_label,
            format_value(value)
        );
    }
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

pub fn render(state: &SimState) -> String {
    let mut e = Exposition {
        text: String::new(),
        model_label: escape_label(&state.model),
    };
    let running = state.scheduler.running() as f64;
    let waiting = state.scheduler.waiting() as f64;
    let c = &state.counters;

    e.family(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests in model execution batches.",
    );
    e.sample("vllm:num_requests_running", "", running);
    e.family(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
    );
    e.sample("vllm:num_requests_waiting", "", waiting);
    e.family(
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
    );
    e.sample(
        "vllm:kv_cache_usage_perc",
        "",
        (running / f64::from(state.scheduler.max_num_seqs())).clamp(0.0, 1.0),
    );
    e.family(
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
    );
    e.sample(
        "vllm:prompt_tokens_total",
        "",
        c.prompt_tokens.load(Ordering::Relaxed) as f64,
    );
    e.family(
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
    );
    e.sample(
        "vllm:generation_tokens_total",
        "",
        c.generation_tokens.load(Ordering::Relaxed) as f64,
    );
    e.family(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    e.sample(
        "vllm:request_success_total",
        ",finished_reason=\"length\"",
        c.success_length.load(Ordering::Relaxed) as f64,
    );
    e.sample(
        "vllm:request_success_total",
        ",finished_reason=\"stop\"",
        c.success_stop.load(Ordering::Relaxed) as f64,
    );
    e.sample(
        "vllm:request_success_total",
        ",finished_reason=\"abort\"",
        c.aborted.load(Ordering::Relaxed) as f64,
    );
    let labels = format!("model_name=\"{}\"", e.model_label);
    for (name, help, h) in [
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &state.hist.ttft,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &state.hist.itl,
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            &state.hist.e2e,
        ),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in the waiting queue in seconds.",
            &state.hist.queue,
        ),
    ] {
        e.family(name, "histogram", help);
        h.render(&mut e.text, name, &labels);
    }
    e.family(
        "gpufleet_sim:injected_failures_total",
        "counter",
        "Requests failed or stalled on purpose (failure injection).",
    );
    e.sample(
        "gpufleet_sim:injected_failures_total",
        "",
        c.injected_failures.load(Ordering::Relaxed) as f64,
    );
    e.family(
        "gpufleet_sim:rejected_requests_total",
        "counter",
        "Requests refused with 429 because the waiting queue was full.",
    );
    e.sample(
        "gpufleet_sim:rejected_requests_total",
        "",
        c.rejected_queue_full.load(Ordering::Relaxed) as f64,
    );
    e.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(
            escape_label(
                r#"a"b\c
d"#
            ),
            r#"a\"b\\c\nd"#
        );
    }

    #[test]
    fn every_sample_has_a_declared_family() {
        let args = crate::SimArgs::for_tests("m\"odel");
        let text = render(&SimState::new(&args));
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !line.starts_with('#') {
                let name = line.split('{').next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| declared.iter().any(|d| d == f))
                    })
                    .unwrap_or(name);
                assert!(declared.iter().any(|d| d == family), "undeclared {name}");
                assert!(line.contains("model_name=\"m\\\"odel\""), "{line}");
                let value = line.rsplit(' ').next().unwrap_or_default();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        assert!(text.ends_with('\n'));
    }
}
