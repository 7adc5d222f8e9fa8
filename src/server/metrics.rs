//! Prometheus metrics, text format. Request-level metrics are kept here; the engine's and
//! the adapter tiers' live numbers are read from their atomics at scrape time. Names carry
//! the `esft_` prefix and base units; counters end in `_total`; label values come from
//! closed sets (route templates, status codes, tiers) or a bounded set of adapter names.

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram as HistogramProto, LabelPair, Metric, MetricFamily,
    MetricType,
};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use std::sync::atomic::Ordering;

use crate::adapter::stats::LOAD_SECONDS_BUCKETS;
use crate::adapter::{AdapterStats, Tier};
use crate::engine::scheduler::EngineStats;
#[cfg(test)]
use crate::engine::AdapterLoad;
use crate::engine::OverloadReason;

pub const BASE_LABEL: &str = "(base)";
pub const OTHER_LABEL: &str = "(other)";

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub inter_token: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub finished: IntCounterVec,
}

fn buckets(opts: HistogramOpts, b: &[f64]) -> HistogramOpts {
    opts.buckets(b.to_vec())
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "esft_http_requests_total",
                "HTTP requests by route and status code.",
            ),
            &["endpoint", "code"],
        )?;
        let request_duration = HistogramVec::new(
            buckets(
                HistogramOpts::new(
                    "esft_request_duration_seconds",
                    "End-to-end latency of generation requests, arrival to last token.",
                ),
                &[
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0,
                ],
            ),
            &["endpoint"],
        )?;
        let ttft = HistogramVec::new(
            buckets(
                HistogramOpts::new(
                    "esft_time_to_first_token_seconds",
                    "Time from a request's arrival to its first generated token, per sequence.",
                ),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
            &["endpoint"],
        )?;
        let inter_token = Histogram::with_opts(buckets(
            HistogramOpts::new(
                "esft_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a sequence.",
            ),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        ))?;
        let prompt_tokens = IntCounter::new(
            "esft_prompt_tokens_total",
            "Prompt tokens of finished generation requests.",
        )?;
        let generation_tokens = IntCounter::new(
            "esft_generation_tokens_total",
            "Generated tokens (every sampled token, EOS included).",
        )?;
        let finished = IntCounterVec::new(
            Opts::new(
                "esft_sequences_finished_total",
                "Sequences that ended, by finish reason (stop, length, cancelled, error).",
            ),
            &["finish_reason"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(inter_token.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        registry.register(Box::new(finished.clone()))?;
        Ok(Self {
            registry,
            http_requests,
            request_duration,
            ttft,
            inter_token,
            prompt_tokens,
            generation_tokens,
            finished,
        })
    }

    /// The whole scrape in Prometheus text format.
    pub fn render(
        &self,
        engine: Option<&EngineStats>,
        adapters: Option<&AdapterStats>,
        fine_tuning: Option<&FineTuningSnapshot>,
        max_adapter_labels: usize,
        reveal_private: bool,
        vllm_names: bool,
    ) -> Result<String, String> {
        let mut families = self.registry.gather();
        if let Some(f) = fine_tuning {
            families.extend(fine_tuning_families(f, max_adapter_labels, reveal_private));
        }
        if let Some(e) = engine {
            families.extend(engine_families(e, max_adapter_labels, reveal_private));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            families.extend(gateway_families(e, reveal_private, vllm_names, now));
        }
        if let Some(a) = adapters {
            families.extend(adapter_families(a));
        }
        // The text encoder refuses a family without samples.
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge_metric(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

fn counter_metric(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(name: &str, help: &str, v: u64) -> MetricFamily {
    family(
        name,
        help,
        MetricType::GAUGE,
        vec![gauge_metric(vec![], v as f64)],
    )
}

/// The fine-tuning numbers of one scrape (read from the records and the runner).
#[derive(Debug, Default)]
pub struct FineTuningSnapshot {
    /// Jobs by status, every status listed.
    pub jobs: Vec<(&'static str, u64)>,
    /// Training tokens per second over the running jobs.
    pub tokens_per_s: f64,
    /// Bytes of stored files by owner (`None`: the admin).
    pub stored_bytes: Vec<(Option<String>, u64)>,
    /// The job duration histogram, when the runner has started.
    pub durations: Vec<MetricFamily>,
}

fn fine_tuning_families(
    f: &FineTuningSnapshot,
    max_labels: usize,
    reveal_private: bool,
) -> Vec<MetricFamily> {
    let jobs = f
        .jobs
        .iter()
        .map(|(status, n)| gauge_metric(vec![label("status", status)], *n as f64))
        .collect();
    let queued = f
        .jobs
        .iter()
        .find(|(s, _)| *s == "queued")
        .map_or(0, |(_, n)| *n);
    // Per owner, bounded: the largest `max_labels` by bytes, the rest summed; owners are
    // named only to scrapers that may see everything.
    let mut rows: Vec<(String, u64)> = f
        .stored_bytes
        .iter()
        .map(|(o, b)| (o.clone().unwrap_or_else(|| "(admin)".into()), *b))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut stored = Vec::new();
    let mut other = 0u64;
    for (i, (owner, bytes)) in rows.into_iter().enumerate() {
        if reveal_private && i < max_labels {
            stored.push(gauge_metric(vec![label("tenant", &owner)], bytes as f64));
        } else {
            other += bytes;
        }
    }
    if other > 0 || stored.is_empty() {
        stored.push(gauge_metric(
            vec![label("tenant", OTHER_LABEL)],
            other as f64,
        ));
    }
    let mut out = vec![
        family(
            "esft_fine_tuning_jobs",
            "Fine-tuning jobs by status.",
            MetricType::GAUGE,
            jobs,
        ),
        gauge(
            "esft_fine_tuning_queue_depth",
            "Fine-tuning jobs waiting to run.",
            queued,
        ),
        family(
            "esft_fine_tuning_tokens_per_second",
            "Training tokens per second over the running fine-tuning jobs (last step).",
            MetricType::GAUGE,
            vec![gauge_metric(vec![], f.tokens_per_s)],
        ),
        family(
            "esft_fine_tuning_stored_file_bytes",
            "Bytes of uploaded files kept, by tenant (the largest owners; the rest as (other)).",
            MetricType::GAUGE,
            stored,
        ),
    ];
    out.extend(f.durations.iter().cloned());
    out
}

fn engine_families(e: &EngineStats, max_labels: usize, reveal_private: bool) -> Vec<MetricFamily> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = vec![
        gauge(
            "esft_requests_waiting",
            "Requests queued for admission (the queue depth).",
            get(&e.waiting),
        ),
        gauge(
            "esft_requests_running",
            "Sequences in the running batch.",
            get(&e.running),
        ),
        gauge(
            "esft_batch_sequences",
            "Sequences in the last forward step (the batch size).",
            get(&e.batch_sequences),
        ),
        gauge(
            "esft_batch_tokens",
            "Tokens in the last forward step.",
            get(&e.batch_tokens),
        ),
        gauge(
            "esft_kv_cache_bytes",
            "Bytes of KV (latent) cache held by running sequences.",
            get(&e.kv_cache_bytes),
        ),
        family(
            "esft_engine_steps_total",
            "Forward steps the engine ran.",
            MetricType::COUNTER,
            vec![counter_metric(vec![], get(&e.steps) as f64)],
        ),
        family(
            "esft_requests_rejected_total",
            "Refused or cut short for load: requests refused at engine.max_waiting or \
             max_waiting_per_tenant; sequences dropped after limits.max_queue_seconds \
             waiting (queue_timeout) or ended at limits.max_request_seconds \
             (request_timeout).",
            MetricType::COUNTER,
            [
                (OverloadReason::Waiting.label(), &e.rejected_waiting),
                (
                    OverloadReason::TenantWaiting.label(),
                    &e.rejected_tenant_waiting,
                ),
                ("queue_timeout", &e.queue_timeouts),
                ("request_timeout", &e.request_timeouts),
            ]
            .into_iter()
            .map(|(reason, n)| counter_metric(vec![label("reason", reason)], get(n) as f64))
            .collect(),
        ),
    ];
    // Per adapter, bounded: the busiest `max_labels` adapters by name, the rest summed;
    // adapters that are not public are named only to scrapers that may see them all.
    let mut rows: Vec<(String, (u64, u64))> = Vec::new();
    let mut other = (0u64, 0u64);
    if let Ok(m) = e.per_adapter.lock() {
        for (k, v) in m.iter() {
            if v.public || reveal_private {
                rows.push((k.clone(), (v.running, v.waiting)));
            } else {
                other.0 += v.running;
                other.1 += v.waiting;
            }
        }
    }
    rows.sort_by(|a, b| {
        (b.1 .0 + b.1 .1)
            .cmp(&(a.1 .0 + a.1 .1))
            .then(a.0.cmp(&b.0))
    });
    let mut labelled: Vec<(String, (u64, u64))> = Vec::new();
    let mut named = 0;
    // The base model always has its row.
    if !rows.iter().any(|r| r.0.is_empty()) {
        rows.push((String::new(), (0, 0)));
    }
    for (name, v) in rows {
        if name.is_empty() {
            labelled.push((BASE_LABEL.to_string(), v));
        } else if named < max_labels {
            named += 1;
            labelled.push((name, v));
        } else {
            other.0 += v.0;
            other.1 += v.1;
        }
    }
    if other != (0, 0) {
        labelled.push((OTHER_LABEL.to_string(), other));
    }
    labelled.sort_by(|a, b| a.0.cmp(&b.0));
    let per = |pick: fn(&(u64, u64)) -> u64| {
        labelled
            .iter()
            .map(|(n, v)| gauge_metric(vec![label("adapter", n)], pick(v) as f64))
            .collect::<Vec<_>>()
    };
    out.push(family(
        "esft_adapter_requests_running",
        "Running sequences per adapter (base model: \"(base)\").",
        MetricType::GAUGE,
        per(|v| v.0),
    ));
    out.push(family(
        "esft_adapter_requests_waiting",
        "Waiting requests per adapter (base model: \"(base)\").",
        MetricType::GAUGE,
        per(|v| v.1),
    ));
    out
}

/// What an inference gateway's endpoint picker scrapes (the Gateway API Inference
/// Extension's model-server protocol): besides the queue depth and running requests above,
/// the KV-cache utilisation (tokens held over the most the running batch can hold) and the
/// adapters of running and of waiting requests with how many fit the device slots at once,
/// in the shape of vLLM's `lora_requests_info` (value: the scrape time, labels:
/// `max_lora`, `running_lora_adapters`, `waiting_lora_adapters`, names comma-separated as
/// requests name them). Adapters that are not public are listed only for scrapers that
/// may see them all. With `vllm_names` the same numbers also appear under vLLM's names,
/// which a picker reads without configuration (names with `:`, which `promtool` flags).
fn gateway_families(
    e: &EngineStats,
    reveal_private: bool,
    vllm_names: bool,
    now: f64,
) -> Vec<MetricFamily> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let capacity = get(&e.kv_capacity_tokens).max(1);
    let usage = (get(&e.kv_cache_tokens) as f64 / capacity as f64).min(1.0);
    let (mut running, mut waiting) = (Vec::new(), Vec::new());
    if let Ok(m) = e.per_adapter.lock() {
        for (key, load) in m.iter() {
            if key.is_empty() || !(load.public || reveal_private) {
                continue;
            }
            let name = key.rsplit('/').next().unwrap_or(key).to_string();
            if load.running > 0 {
                running.push(name.clone());
            }
            if load.waiting > 0 {
                waiting.push(name);
            }
        }
    }
    for list in [&mut running, &mut waiting] {
        list.sort();
        list.dedup();
    }
    let max_lora = get(&e.adapter_capacity).to_string();
    let info = |name: &str| {
        family(
            name,
            "Adapters of running and of waiting requests, and how many fit the device slots \
             at once (max_lora); the value is the time of the scrape.",
            MetricType::GAUGE,
            vec![gauge_metric(
                vec![
                    label("max_lora", &max_lora),
                    label("running_lora_adapters", &running.join(",")),
                    label("waiting_lora_adapters", &waiting.join(",")),
                ],
                now,
            )],
        )
    };
    let ratio = |name: &str| {
        family(
            name,
            "KV-cache utilisation: tokens held by running sequences over max_running x \
             max_context, 0 to 1.",
            MetricType::GAUGE,
            vec![gauge_metric(vec![], usage)],
        )
    };
    let mut out = vec![
        ratio("esft_kv_cache_usage_ratio"),
        info("esft_lora_requests_info"),
    ];
    if vllm_names {
        out.extend([
            gauge(
                "vllm:num_requests_running",
                "Sequences in the running batch.",
                get(&e.running),
            ),
            gauge(
                "vllm:num_requests_waiting",
                "Requests queued for admission.",
                get(&e.waiting),
            ),
            ratio("vllm:gpu_cache_usage_perc"),
            ratio("vllm:kv_cache_usage_perc"),
            info("vllm:lora_requests_info"),
        ]);
    }
    out
}

fn adapter_families(a: &AdapterStats) -> Vec<MetricFamily> {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    type Pick = fn(&crate::adapter::stats::TierCounters) -> &std::sync::atomic::AtomicU64;
    let per_tier = |name: &str, help: &str, kind: MetricType, pick: Pick| {
        let metrics = Tier::ALL
            .iter()
            .map(|&t| {
                let v = get(pick(a.tier(t))) as f64;
                let l = vec![label("tier", t.label())];
                match kind {
                    MetricType::COUNTER => counter_metric(l, v),
                    _ => gauge_metric(l, v),
                }
            })
            .collect();
        family(name, help, kind, metrics)
    };
    let c = MetricType::COUNTER;
    let g = MetricType::GAUGE;
    let mut out = vec![
        per_tier(
            "esft_adapter_lookups_total",
            "Adapter lookups per tier (disk: directory, host: memory cache, device: slots).",
            c,
            |t| &t.lookups,
        ),
        per_tier(
            "esft_adapter_hits_total",
            "Adapter lookups that found the adapter in the tier.",
            c,
            |t| &t.hits,
        ),
        per_tier(
            "esft_adapter_misses_total",
            "Adapter lookups that did not find the adapter in the tier.",
            c,
            |t| &t.misses,
        ),
        per_tier(
            "esft_adapter_loads_total",
            "Adapters brought into the tier.",
            c,
            |t| &t.loads,
        ),
        per_tier(
            "esft_adapter_evictions_total",
            "Adapters evicted from the tier.",
            c,
            |t| &t.evictions,
        ),
        per_tier(
            "esft_adapter_load_failures_total",
            "Adapters that failed to load into the tier (invalid or unreadable).",
            c,
            |t| &t.load_failures,
        ),
        per_tier(
            "esft_adapters_resident",
            "Adapters resident in the tier.",
            g,
            |t| &t.resident,
        ),
        per_tier(
            "esft_adapter_resident_bytes",
            "Bytes of adapters resident in the tier.",
            g,
            |t| &t.resident_bytes,
        ),
        gauge(
            "esft_device_expert_slots_used",
            "Expert slots holding experts on the device (base experts included).",
            get(&a.device_slots_used),
        ),
        gauge(
            "esft_device_expert_slots",
            "Expert slots the device can hold (base experts plus the adapter slot budget).",
            get(&a.device_slots_total),
        ),
    ];
    let mut h = HistogramProto::default();
    let mut cumulative = 0u64;
    let mut bs = Vec::new();
    for (i, &ub) in LOAD_SECONDS_BUCKETS.iter().enumerate() {
        cumulative += get(&a.load_seconds_buckets[i]);
        let mut b = Bucket::default();
        b.set_upper_bound(ub);
        b.set_cumulative_count(cumulative);
        bs.push(b);
    }
    h.set_bucket(bs);
    h.set_sample_count(get(&a.load_count));
    h.set_sample_sum(get(&a.load_seconds_sum_micros) as f64 / 1e6);
    let mut m = Metric::default();
    m.set_histogram(h);
    out.push(family(
        "esft_adapter_load_duration_seconds",
        "Time to read and validate an adapter from disk.",
        MetricType::HISTOGRAM,
        vec![m],
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_adapter_labels_are_bounded() {
        let e = EngineStats::default();
        let load = |running, waiting, public| AdapterLoad {
            running,
            waiting,
            public,
        };
        {
            let mut m = e.per_adapter.lock().unwrap();
            m.insert(String::new(), load(2, 1, true));
            for i in 0..10 {
                m.insert(format!("a{i}"), load(i, 0, true));
            }
            m.insert("acme/secret".into(), load(100, 0, false));
        }
        let text = Metrics::new()
            .unwrap()
            .render(Some(&e), None, None, 3, false, false)
            .unwrap();
        let running: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("esft_adapter_requests_running{"))
            .collect();
        // base, the 3 busiest public ones (a9, a8, a7) and the rest summed, the private
        // one among them unnamed: 0 + 1 + ... + 6 + 100 = 121.
        assert_eq!(running.len(), 5, "{running:?}");
        assert!(!text.contains("secret"));
        assert!(running.contains(&"esft_adapter_requests_running{adapter=\"(other)\"} 121"));
        assert!(running.contains(&"esft_adapter_requests_running{adapter=\"a9\"} 9"));
        assert!(running.contains(&"esft_adapter_requests_running{adapter=\"(base)\"} 2"));
    }

    #[test]
    fn gateway_gauges_follow_the_inference_extension_protocol() {
        let e = EngineStats::default();
        e.waiting.store(3, Ordering::Relaxed);
        e.running.store(2, Ordering::Relaxed);
        e.kv_cache_tokens.store(1024, Ordering::Relaxed);
        e.kv_capacity_tokens.store(4096, Ordering::Relaxed);
        e.adapter_capacity.store(7, Ordering::Relaxed);
        {
            let load = |running, waiting, public| AdapterLoad {
                running,
                waiting,
                public,
            };
            let mut m = e.per_adapter.lock().unwrap();
            m.insert(String::new(), load(1, 1, true));
            m.insert("law".into(), load(2, 0, true));
            m.insert("intent".into(), load(1, 2, true));
            m.insert("sql".into(), load(0, 1, true));
            m.insert("acme/secret".into(), load(1, 1, false));
        }
        let render = |reveal, vllm| {
            Metrics::new()
                .unwrap()
                .render(Some(&e), None, None, 8, reveal, vllm)
                .unwrap()
        };
        let text = render(false, false);
        assert!(
            text.contains("\nesft_kv_cache_usage_ratio 0.25\n"),
            "{text}"
        );
        let info = text
            .lines()
            .find(|l| l.starts_with("esft_lora_requests_info{"))
            .unwrap();
        assert!(info.starts_with(
            "esft_lora_requests_info{max_lora=\"7\",running_lora_adapters=\"intent,law\",\
             waiting_lora_adapters=\"intent,sql\"} "
        ));
        let stamp: f64 = info.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(stamp > 1.7e9, "the value is the scrape time: {stamp}");
        assert!(!text.contains("vllm:"));
        // A scraper that may see everything gets the private adapter by its request name.
        assert!(render(true, false).contains("running_lora_adapters=\"intent,law,secret\""));
        let text = render(false, true);
        for line in [
            "vllm:num_requests_waiting 3",
            "vllm:num_requests_running 2",
            "vllm:gpu_cache_usage_perc 0.25",
            "vllm:kv_cache_usage_perc 0.25",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line}: {text}");
        }
        assert!(text.contains("\nvllm:lora_requests_info{max_lora=\"7\","));
    }

    #[test]
    fn load_histogram_is_cumulative() {
        let a = AdapterStats::default();
        a.record_load(0.02);
        a.record_load(3.0);
        let text = Metrics::new()
            .unwrap()
            .render(None, Some(&a), None, 8, true, false)
            .unwrap();
        assert!(text.contains("esft_adapter_load_duration_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("esft_adapter_load_duration_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("esft_adapter_load_duration_seconds_count 2"));
        assert!(text.contains("esft_adapter_load_duration_seconds_bucket{le=\"+Inf\"} 2"));
    }

    #[test]
    fn fine_tuning_owners_are_bounded_and_named_only_when_revealed() {
        let f = FineTuningSnapshot {
            jobs: vec![("queued", 2), ("running", 1), ("succeeded", 0)],
            tokens_per_s: 1234.5,
            stored_bytes: vec![
                (Some("acme".into()), 300),
                (Some("globex".into()), 200),
                (None, 100),
                (Some("initech".into()), 50),
            ],
            durations: vec![],
        };
        let render = |reveal| {
            Metrics::new()
                .unwrap()
                .render(None, None, Some(&f), 2, reveal, false)
                .unwrap()
        };
        let text = render(true);
        assert!(
            text.contains("esft_fine_tuning_jobs{status=\"queued\"} 2"),
            "{text}"
        );
        assert!(text.contains("esft_fine_tuning_jobs{status=\"succeeded\"} 0"));
        assert!(text.contains("esft_fine_tuning_queue_depth 2"));
        assert!(text.contains("esft_fine_tuning_tokens_per_second 1234.5"));
        // The two largest owners by name, the admin's and initech's bytes summed.
        assert!(text.contains("esft_fine_tuning_stored_file_bytes{tenant=\"acme\"} 300"));
        assert!(text.contains("esft_fine_tuning_stored_file_bytes{tenant=\"globex\"} 200"));
        assert!(text.contains("esft_fine_tuning_stored_file_bytes{tenant=\"(other)\"} 150"));
        let hidden = render(false);
        assert!(
            !hidden.contains("acme") && !hidden.contains("globex"),
            "{hidden}"
        );
        assert!(hidden.contains("esft_fine_tuning_stored_file_bytes{tenant=\"(other)\"} 650"));
    }
}
