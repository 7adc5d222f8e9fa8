//! The engine's continuous batching: requests for the base and many adapters share steps,
//! arrive at different times, and each gets exactly what it gets alone; a request keeps
//! the adapter version it was bound to across replacement; admission is fair among tenants.

mod common;

use common::*;
use esft::adapter::{AdapterKey, AdapterRegistry, AdapterStats, AdapterStore, BaseModel, Version};
use esft::engine::{
    Engine, EngineConfig, Event, FinishReason, GenerateRequest, OverloadReason, SamplingParams,
    SubmitError,
};
use esft::model::LoadedModel;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn adapter_spec(i: u64) -> AdapterSpec {
    let e = |k: u64| ((i * 5 + k * 3) % 16) as usize;
    AdapterSpec {
        experts: vec![(1, vec![e(0), e(1), e(2)]), (2, vec![e(3), e(4)])],
        shared: false,
        seed: 10 + i,
    }
}

fn engine(root: &Path, config: EngineConfig) -> Arc<Engine> {
    engine_for("lite", root, config)
}

fn engine_for(fixture_name: &str, root: &Path, config: EngineConfig) -> Arc<Engine> {
    let loaded = LoadedModel::load(&fixture(fixture_name), &load_options()).unwrap();
    let base = Arc::new(BaseModel::new(
        loaded.model.config().clone(),
        loaded.store.clone(),
    ));
    let stats = Arc::new(AdapterStats::default());
    let registry = Arc::new(AdapterRegistry::new(
        AdapterStore::open(root).unwrap(),
        base,
        candle_core::DType::F32,
        1 << 30,
        stats,
    ));
    Engine::start(loaded.model, Arc::new(loaded.tokenizer), registry, config)
}

/// The current version of the shared adapter `name`.
fn version(eng: &Engine, name: &str) -> Arc<Version> {
    eng.registry
        .resolve(&[AdapterKey::shared(name)])
        .unwrap_or_else(|| panic!("no adapter {name}"))
}

fn request(prompt: &[u32], adapter: Option<&Arc<Version>>, n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(n)
        },
        adapter: adapter.cloned(),
        tenant: None,
        arrival: None,
    }
}

fn prompts() -> Vec<Vec<u32>> {
    prompt_ids(&reference("lite"))
}

/// Runs each request alone, one after the other.
fn alone(engine: &Engine, reqs: &[GenerateRequest]) -> Vec<Vec<u32>> {
    reqs.iter()
        .map(|r| {
            let c = engine.submit(r.clone()).unwrap().collect_blocking();
            assert_eq!(c.error, None);
            c.tokens
        })
        .collect()
}

#[test]
fn mixed_continuous_batch_equals_each_request_alone() {
    check_mixed_batch("lite");
}

#[test]
fn mixed_continuous_batch_equals_each_request_alone_for_every_architecture() {
    for name in ["deepseek-v3", "qwen3-moe", "qwen3-moe-dense0", "olmoe"] {
        check_mixed_batch(name);
    }
}

/// Base and two adapters, arriving one after the other into a running batch with a small
/// prefill chunk: every request gets the tokens it gets alone.
fn check_mixed_batch(fixture_name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    for (i, name) in ["a", "b"].iter().enumerate() {
        write_native_adapter(
            &fixture(fixture_name),
            &tmp.path().join(name),
            &adapter_spec(i as u64),
        );
    }
    let eng = engine_for(
        fixture_name,
        tmp.path(),
        EngineConfig {
            prefill_chunk: 5,
            ..EngineConfig::default()
        },
    );
    let p = prompt_ids(&reference(fixture_name));
    let (a, b) = (version(&eng, "a"), version(&eng, "b"));
    let reqs = vec![
        request(&p[0], None, 24),
        request(&p[1], Some(&a), 20),
        request(&p[2], Some(&b), 18),
        request(&p[0], Some(&a), 16),
    ];
    let want = alone(&eng, &reqs);
    assert_ne!(
        want[0], want[3],
        "{fixture_name}: adapter a changes the output of prompt 0"
    );

    // Each request arrives once the previous one has produced tokens.
    let mut handles = Vec::new();
    for r in &reqs {
        let mut h = eng.submit(r.clone()).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            match h.events.blocking_recv().unwrap() {
                Event::Token(t) => got.push(t.token),
                other => panic!("{other:?}"),
            }
        }
        handles.push((h, got));
    }
    for (i, (mut h, mut got)) in handles.into_iter().enumerate() {
        loop {
            match h.events.blocking_recv().unwrap() {
                Event::Token(t) => got.push(t.token),
                Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    assert_eq!(reason, FinishReason::Length);
                    assert_eq!(prompt_tokens, reqs[i].prompt.len());
                    assert_eq!(completion_tokens, got.len());
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, want[i], "{fixture_name}: request {i}");
    }
    eng.shutdown();
}

#[test]
fn more_adapters_than_device_slots_all_complete_correctly() {
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("task{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        write_native_adapter(
            &fixture("lite"),
            &tmp.path().join(n),
            &adapter_spec(i as u64),
        );
    }
    let p = prompts();
    // Reference: an engine with room for every adapter.
    let roomy = engine(tmp.path(), EngineConfig::default());
    let versions: Vec<Arc<Version>> = names.iter().map(|n| version(&roomy, n)).collect();
    let reqs: Vec<GenerateRequest> = (0..12)
        .map(|i| request(&p[i % 3], Some(&versions[i % names.len()]), 10 + i % 4))
        .chain([request(&p[1], None, 12)])
        .collect();
    let want = alone(&roomy, &reqs);
    roomy.shutdown();

    // Room for two adapters (5 experts x 18 KiB each).
    let expert_bytes = 3 * 24 * 64 * 4;
    let eng = engine(
        tmp.path(),
        EngineConfig {
            device_slot_bytes: 2 * 5 * expert_bytes,
            ..EngineConfig::default()
        },
    );
    let handles: Vec<_> = reqs
        .iter()
        .map(|r| eng.submit(r.clone()).unwrap())
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let c = h.collect_blocking();
        assert_eq!(c.error, None, "request {i}");
        assert_eq!(c.tokens, want[i], "request {i}");
    }
    let s = &eng.registry.stats;
    let evictions = s.device.evictions.load(Ordering::Relaxed);
    let loads = s.device.loads.load(Ordering::Relaxed);
    assert!(loads >= 6, "every adapter was made resident: {loads}");
    assert!(evictions >= 4, "slots were recycled: {evictions}");
    assert!(s.device.resident.load(Ordering::Relaxed) <= 2);
    assert!(s.device.lookups.load(Ordering::Relaxed) >= s.device.hits.load(Ordering::Relaxed));
    eng.shutdown();
}

#[test]
fn a_refused_adapter_fails_its_requests_only() {
    let tmp = tempfile::tempdir().unwrap();
    write_native_adapter(&fixture("lite"), &tmp.path().join("good"), &adapter_spec(1));
    write_native_adapter(&fixture("lite"), &tmp.path().join("bad"), &adapter_spec(2));
    std::fs::write(tmp.path().join("bad/adapter.safetensors"), b"garbage").unwrap();
    let eng = engine(tmp.path(), EngineConfig::default());
    let p = prompts();
    let (good_v, bad_v) = (version(&eng, "good"), version(&eng, "bad"));
    assert!(eng
        .registry
        .resolve(&[AdapterKey::shared("missing")])
        .is_none());
    let hs = [
        eng.submit(request(&p[0], Some(&good_v), 8)).unwrap(),
        eng.submit(request(&p[0], Some(&bad_v), 8)).unwrap(),
        eng.submit(request(&p[0], None, 8)).unwrap(),
    ];
    let [good, bad, base] = hs.map(|h| h.collect_blocking());
    assert_eq!(good.tokens.len(), 8);
    assert_eq!(base.tokens.len(), 8);
    let msg = bad.error.as_deref().unwrap();
    assert!(msg.contains("adapter bad"), "{bad:?}");
    assert!(
        !msg.contains(&*tmp.path().to_string_lossy()),
        "no server paths: {msg}"
    );
    eng.shutdown();
}

#[test]
fn dropping_a_handle_cancels_and_frees_the_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = engine(tmp.path(), EngineConfig::default());
    let p = prompts();
    let mut h = eng.submit(request(&p[0], None, 100_000)).unwrap();
    assert!(matches!(h.events.blocking_recv(), Some(Event::Token(_))));
    drop(h);
    let other = eng
        .submit(request(&p[1], None, 4))
        .unwrap()
        .collect_blocking();
    assert_eq!(other.tokens.len(), 4);
    for _ in 0..100 {
        if eng.stats.running.load(Ordering::Relaxed) == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(eng.stats.running.load(Ordering::Relaxed), 0);
    assert_eq!(eng.stats.kv_cache_bytes.load(Ordering::Relaxed), 0);
    eng.shutdown();
}

#[test]
fn invalid_requests_are_refused_at_submit() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = engine(
        tmp.path(),
        EngineConfig {
            max_context: 64,
            ..EngineConfig::default()
        },
    );
    assert_eq!(
        eng.submit(request(&[], None, 4))
            .err()
            .map(|e| invalid_field(&e)),
        Some("prompt")
    );
    assert_eq!(
        eng.submit(request(&[0, 9999], None, 4))
            .err()
            .map(|e| invalid_field(&e)),
        Some("prompt")
    );
    assert_eq!(
        eng.submit(request(&[1; 64], None, 4))
            .err()
            .map(|e| invalid_field(&e)),
        Some("prompt")
    );
    assert_eq!(
        eng.submit(request(&[1], None, 0))
            .err()
            .map(|e| invalid_field(&e)),
        Some("max_tokens")
    );
    // A request that would run past the context stops with `length`.
    let c = eng
        .submit(request(&[1; 60], None, 50))
        .unwrap()
        .collect_blocking();
    assert_eq!(c.finish, Some(FinishReason::Length));
    assert_eq!(c.tokens.len(), 4);
    eng.shutdown();
}

/// Installs `spec` as the shared adapter `name` through the engine's registry.
fn install(eng: &Engine, name: &str, spec: &AdapterSpec) -> Arc<Version> {
    let staging = eng.registry.store.staging().unwrap();
    write_native_adapter(&fixture("lite"), &staging.dir(), spec);
    eng.registry
        .install(&AdapterKey::shared(name), staging, false)
        .unwrap()
        .version
}

fn device_has(eng: &Engine, v: &Version) -> bool {
    eng.stats.device_versions.lock().unwrap().contains(&v.id())
}

#[test]
fn a_request_keeps_its_version_across_replacement_and_the_old_slots_are_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = engine(tmp.path(), EngineConfig::default());
    let p = prompts();
    let v1 = install(&eng, "x", &adapter_spec(1));
    let want1 = alone(&eng, &[request(&p[0], Some(&v1), 40)]).remove(0);
    // A long request bound to version 1 is running when version 2 replaces it.
    let mut h1 = eng.submit(request(&p[0], Some(&v1), 40)).unwrap();
    let mut got1 = Vec::new();
    match h1.events.blocking_recv().unwrap() {
        Event::Token(t) => got1.push(t.token),
        other => panic!("{other:?}"),
    }
    let v2 = install(&eng, "x", &adapter_spec(2));
    assert!(v1.is_retired() && !v2.is_retired());
    assert_eq!(version(&eng, "x").id(), v2.id());
    let want2_alone = {
        let other = tempfile::tempdir().unwrap();
        write_native_adapter(&fixture("lite"), &other.path().join("y"), &adapter_spec(2));
        let e2 = engine(other.path(), EngineConfig::default());
        let r = alone(&e2, &[request(&p[0], Some(&version(&e2, "y")), 12)]).remove(0);
        e2.shutdown();
        r
    };
    let c2 = eng
        .submit(request(&p[0], Some(&v2), 12))
        .unwrap()
        .collect_blocking();
    assert_eq!(
        c2.tokens, want2_alone,
        "the new request gets the new version"
    );
    assert_ne!(want2_alone[..], want1[..12], "the versions differ");
    while let Some(ev) = h1.events.blocking_recv() {
        match ev {
            Event::Token(t) => got1.push(t.token),
            Event::Finished { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got1, want1, "the running request finished on its version");
    // Its last request ended: the retired version's slots and host copy go.
    for _ in 0..200 {
        if !device_has(&eng, &v1) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!device_has(&eng, &v1) && device_has(&eng, &v2));
    assert!(!eng.registry.in_host(v1.id()));
    eng.shutdown();
}

/// An engine with four running slots, at most `cap` of them for one tenant (0: no cap).
fn four_slots(root: &Path, cap: usize) -> Arc<Engine> {
    engine(
        root,
        EngineConfig {
            max_running: 4,
            max_batch_tokens: 64,
            max_running_per_tenant: cap,
            ..EngineConfig::default()
        },
    )
}

/// The field an invalid request was refused for.
fn invalid_field(e: &SubmitError) -> &'static str {
    match e {
        SubmitError::Invalid(field, _) => field,
        other => panic!("{other:?}"),
    }
}

/// A request of `tenant` for `n` tokens.
fn of(tenant: &str, n: usize) -> GenerateRequest {
    GenerateRequest {
        tenant: Some(tenant.to_string()),
        ..request(&prompts()[0], None, n)
    }
}

#[test]
fn a_tenant_over_its_fair_share_waits_while_another_tenant_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = four_slots(tmp.path(), 0);
    // Tenant a fills every running slot and queues four more; then tenant b asks twice.
    let mut a: Vec<_> = [200, 200, 200, 200, 8, 8, 8, 8]
        .iter()
        .map(|&n| eng.submit(of("a", n)).unwrap())
        .collect();
    for h in &mut a[..4] {
        assert!(matches!(h.events.blocking_recv(), Some(Event::Token(_))));
    }
    let mut b: Vec<_> = [5, 100]
        .iter()
        .map(|&n| eng.submit(of("b", n)).unwrap())
        .collect();
    while eng.stats.waiting.load(Ordering::Relaxed) < 6 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // A slot frees: it goes to b (first come first served would give it to a), and so does
    // the one b's first request frees.
    drop(a.remove(0));
    assert!(matches!(b[1].events.blocking_recv(), Some(Event::Token(_))));
    for (i, h) in a.iter_mut().enumerate().skip(3) {
        assert!(
            h.events.try_recv().is_err(),
            "a's queued request {i} started before b's"
        );
    }
    for h in b {
        assert_eq!(h.collect_blocking().finish, Some(FinishReason::Length));
    }
    for (i, h) in a.into_iter().enumerate() {
        assert_eq!(
            h.collect_blocking().finish,
            Some(FinishReason::Length),
            "{i}"
        );
    }
    eng.shutdown();
}

#[test]
fn the_per_tenant_cap_leaves_room_for_others() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = four_slots(tmp.path(), 3);
    let mut a: Vec<_> = (0..4).map(|_| eng.submit(of("a", 80)).unwrap()).collect();
    assert!(matches!(a[0].events.blocking_recv(), Some(Event::Token(_))));
    // Only three of a's run: b starts at once and finishes long before them.
    let b = eng.submit(of("b", 4)).unwrap().collect_blocking();
    assert_eq!(b.tokens.len(), 4);
    let got = a[3].events.try_recv();
    assert!(
        got.is_err(),
        "a's fourth request waits: {:?}",
        got.map(|e| format!("{e:?}"))
    );
    for h in a {
        assert_eq!(h.collect_blocking().finish, Some(FinishReason::Length));
    }
    eng.shutdown();
}

#[test]
fn waiting_is_bounded_in_all_and_per_tenant_and_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = engine(
        tmp.path(),
        EngineConfig {
            max_running: 2,
            max_batch_tokens: 64,
            max_waiting: 3,
            max_waiting_per_tenant: 2,
            ..EngineConfig::default()
        },
    );
    // Two run (their places are given back as they start), two of a's wait.
    let mut running: Vec<_> = (0..2).map(|_| eng.submit(of("a", 400)).unwrap()).collect();
    for h in &mut running {
        assert!(matches!(h.events.blocking_recv(), Some(Event::Token(_))));
    }
    let queued: Vec<_> = (0..2).map(|_| eng.submit(of("a", 4)).unwrap()).collect();
    assert_eq!(eng.admission.waiting(), 2);
    // a's third waiter: its tenant's limit. b fits once, then the whole limit is reached.
    let e = eng.submit(of("a", 4)).err().unwrap();
    assert!(
        matches!(&e, SubmitError::Overloaded(o) if o.reason == OverloadReason::TenantWaiting),
        "{e:?}"
    );
    let b = eng.submit(of("b", 4)).unwrap();
    let e = eng.submit(of("c", 4)).err().unwrap();
    assert!(
        matches!(&e, SubmitError::Overloaded(o) if o.reason == OverloadReason::Waiting),
        "{e:?}"
    );
    // Several places at once are all or none.
    assert!(eng.reserve(Some("c"), 2).is_err());
    assert_eq!(eng.admission.waiting(), 3);
    // Cancelled waiters give their places back.
    drop(queued);
    drop(running);
    assert_eq!(b.collect_blocking().tokens.len(), 4);
    assert_eq!(eng.admission.waiting(), 0);
    assert_eq!(
        eng.submit(of("c", 2))
            .unwrap()
            .collect_blocking()
            .tokens
            .len(),
        2
    );
    eng.shutdown();
}

#[test]
fn a_request_waiting_too_long_is_dropped_and_one_running_too_long_ends_as_length() {
    let tmp = tempfile::tempdir().unwrap();
    let eng = engine(
        tmp.path(),
        EngineConfig {
            max_running: 1,
            max_batch_tokens: 64,
            max_queue: Some(std::time::Duration::from_millis(100)),
            max_request: Some(std::time::Duration::from_millis(400)),
            ..EngineConfig::default()
        },
    );
    let started = std::time::Instant::now();
    let mut long = eng.submit(of("a", 100_000)).unwrap();
    assert!(matches!(long.events.blocking_recv(), Some(Event::Token(_))));
    let mut waiter = eng.submit(of("b", 4)).unwrap();
    // The waiter never starts (the one slot is busy) and is dropped after its wait.
    match waiter.events.blocking_recv() {
        Some(Event::QueueTimeout(waited)) => {
            assert!(
                waited >= std::time::Duration::from_millis(100),
                "{waited:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(eng.stats.queue_timeouts.load(Ordering::Relaxed), 1);
    // The long one ends by time as `length`, with every token it made counted.
    let mut tokens = 1;
    let end = loop {
        match long.events.blocking_recv() {
            Some(Event::Token(_)) => tokens += 1,
            Some(Event::Finished {
                reason,
                completion_tokens,
                ..
            }) => break (reason, completion_tokens),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(end, (FinishReason::Length, tokens));
    // Ended by time, well before the context (4096) would have ended it.
    assert!(tokens + prompts()[0].len() < 4000, "{tokens}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    assert_eq!(eng.stats.request_timeouts.load(Ordering::Relaxed), 1);
    // A request that starts at once is not touched by the queue limit.
    assert_eq!(
        eng.submit(of("b", 4))
            .unwrap()
            .collect_blocking()
            .tokens
            .len(),
        4
    );
    eng.shutdown();
}
