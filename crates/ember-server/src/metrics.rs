//! `/metrics`: engine gauges and counters read at scrape time, plus latency histograms the
//! server records from the events it streams.

use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::Shared;

pub struct Metrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    kv_used: Gauge,
    kv_total: Gauge,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    preemptions: Counter,
    spec_drafted: Counter,
    spec_accepted: Counter,
    pub ttft: Histogram,
    pub tpot: Histogram,
    /// Serializes scrapes: counters are brought up to the engine's totals by adding the
    /// difference, which two concurrent scrapes would otherwise both add.
    scrape: Mutex<()>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let running = Gauge::default();
        let waiting = Gauge::default();
        let kv_used = Gauge::default();
        let kv_total = Gauge::default();
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let preemptions = Counter::default();
        let spec_drafted = Counter::default();
        let spec_accepted = Counter::default();
        // vLLM's buckets for the same two histograms.
        let ttft = Histogram::new([
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0,
        ]);
        let tpot = Histogram::new([
            0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0,
        ]);
        registry.register(
            "ember_requests_running",
            "Requests decoding now",
            running.clone(),
        );
        registry.register(
            "ember_requests_waiting",
            "Requests queued for a slot",
            waiting.clone(),
        );
        registry.register(
            "ember_kv_cache_used_blocks",
            "KV cache blocks held by requests (blocks kept only for prefix reuse count as free)",
            kv_used.clone(),
        );
        registry.register(
            "ember_kv_cache_total_blocks",
            "KV cache blocks in the pool",
            kv_total.clone(),
        );
        // The `_total` suffix is added by the encoder for counters.
        registry.register(
            "ember_prompt_tokens",
            "Prompt tokens submitted",
            prompt_tokens.clone(),
        );
        registry.register(
            "ember_generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "ember_preemptions",
            "Sequences preempted for KV space (recomputed later, same output)",
            preemptions.clone(),
        );
        registry.register(
            "ember_spec_drafted_tokens",
            "Tokens proposed by speculative decoding and checked by the model",
            spec_drafted.clone(),
        );
        registry.register(
            "ember_spec_accepted_tokens",
            "Proposed tokens the model accepted (each one a forward pass saved)",
            spec_accepted.clone(),
        );
        registry.register(
            "ember_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            ttft.clone(),
        );
        registry.register(
            "ember_time_per_output_token_seconds",
            "Time between consecutive generated tokens of a request",
            tpot.clone(),
        );
        Self {
            registry,
            running,
            waiting,
            kv_used,
            kv_total,
            prompt_tokens,
            generated_tokens,
            preemptions,
            spec_drafted,
            spec_accepted,
            ttft,
            tpot,
            scrape: Mutex::new(()),
        }
    }

    pub fn observe_ttft(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    pub fn observe_tpot(&self, d: Duration) {
        self.tpot.observe(d.as_secs_f64());
    }
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub async fn scrape(State(state): State<Shared>) -> Response {
    let m = &state.metrics;
    let stats = state.engine.stats();
    let _guard = m.scrape.lock().unwrap_or_else(|p| p.into_inner());
    m.running.set(as_i64(stats.running));
    m.waiting.set(as_i64(stats.waiting));
    m.kv_used.set(as_i64(stats.kv_used_blocks));
    m.kv_total.set(as_i64(stats.kv_total_blocks));
    m.prompt_tokens.inc_by(
        stats
            .prompt_tokens_total
            .saturating_sub(m.prompt_tokens.get()),
    );
    m.generated_tokens.inc_by(
        stats
            .generated_tokens_total
            .saturating_sub(m.generated_tokens.get()),
    );
    m.preemptions
        .inc_by(stats.preemptions_total.saturating_sub(m.preemptions.get()));
    m.spec_drafted.inc_by(
        stats
            .spec_drafted_total
            .saturating_sub(m.spec_drafted.get()),
    );
    m.spec_accepted.inc_by(
        stats
            .spec_accepted_total
            .saturating_sub(m.spec_accepted.get()),
    );
    let mut out = String::new();
    if encode(&mut out, &m.registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
