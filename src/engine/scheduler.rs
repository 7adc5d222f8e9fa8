//! The engine: one scheduler thread owns the model and the device expert slots and runs
//! continuous batching. Requests join at step boundaries (long prompts prefill in chunks),
//! finished or cancelled ones leave, adapters load on loader threads while everyone else
//! keeps decoding.
//!
//! A request carries the adapter version it was bound to when the server accepted it, and
//! keeps it to the end: host copies, loads and device slots are keyed by version id, so a
//! replaced or deleted adapter never serves a request bound to another version. A retired
//! version's slots are freed once its last request ends.
//!
//! Admission is FIFO within fair shares: while requests of several tenants wait, a tenant
//! running its share of `max_running` (split evenly among the tenants with requests) or
//! more waits for the others; `max_running_per_tenant` caps it outright. A request whose
//! adapter is still loading from disk is passed over (it does not hold up those behind it).
//! A request whose adapter is loaded but finds every device slot pinned blocks the admission
//! of later requests that would pin *other* adapters, so busy adapters drain, get evicted,
//! and no adapter can be starved.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::admission::{Admission, Overload, OverloadReason, WaitSlot};
use super::batch::step;
use super::sampler::SamplingParams;
use super::sequence::{FinishReason, Sequence, TokenEvent};
use crate::adapter::{
    AdapterError, AdapterRegistry, AdapterWeights, DeviceSlots, Install, Version, VersionId,
};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{Decoder, ExpertMap};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in the running batch.
    pub max_running: usize,
    /// Most tokens (decode + prefill) in one step.
    pub max_batch_tokens: usize,
    /// Most prompt tokens one sequence prefills per step.
    pub prefill_chunk: usize,
    /// Byte budget of adapter expert slots on the compute device.
    pub device_slot_bytes: usize,
    /// Longest sequence (prompt + output).
    pub max_context: usize,
    /// Most running sequences of one tenant; 0 = only the fair share applies.
    pub max_running_per_tenant: usize,
    /// Most sequences accepted and not yet running, in all and of one tenant; beyond them a
    /// request is refused ([`Overload`]). 0 = no limit.
    pub max_waiting: usize,
    pub max_waiting_per_tenant: usize,
    /// A sequence waiting longer than this to start is dropped ([`Event::QueueTimeout`]).
    pub max_queue: Option<Duration>,
    /// A request running longer than this (from its arrival) ends with the tokens so far,
    /// `finish_reason` `length`.
    pub max_request: Option<Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 64,
            max_batch_tokens: 2048,
            prefill_chunk: 512,
            device_slot_bytes: 1 << 30,
            max_context: 4096,
            max_running_per_tenant: 0,
            max_waiting: 0,
            max_waiting_per_tenant: 0,
            max_queue: None,
            max_request: None,
        }
    }
}

/// Why [`Engine::submit`] refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// A field of the request is out of range (the field, what is wrong).
    #[error("{1}")]
    Invalid(&'static str, String),
    /// Too many sequences are waiting.
    #[error(transparent)]
    Overloaded(#[from] Overload),
    #[error("the engine has stopped")]
    Stopped,
}

/// What an overloaded engine tells a refused client to wait before retrying.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A generation request as the engine receives it (already tokenized).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// The adapter version to run with; `None` for the base model.
    pub adapter: Option<Arc<Version>>,
    /// Who asked: admission is fair among tenants (`None`: callers without a tenant).
    pub tenant: Option<String>,
    /// When the request arrived (the start of its `max_queue` and `max_request` time);
    /// `None`: when it is submitted.
    pub arrival: Option<Instant>,
}

impl GenerateRequest {
    fn version(&self) -> Option<VersionId> {
        self.adapter.as_ref().map(|v| v.id())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(TokenEvent),
    /// The request ended; `completion_tokens` counts every generated token.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request could not run (adapter refused, model error).
    Error(String),
    /// The request waited `max_queue` without starting, and was dropped.
    QueueTimeout(Duration),
}

/// The caller's side of a request: its events, and cancellation when dropped.
pub struct RequestHandle {
    pub id: u64,
    pub events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the end of the request (blocking; not for use inside an async runtime).
    pub fn collect_blocking(mut self) -> Completed {
        let mut out = Completed::default();
        while let Some(ev) = self.events.blocking_recv() {
            match ev {
                Event::Token(t) => {
                    out.tokens.push(t.token);
                    out.text.push_str(&t.text);
                }
                Event::Finished { reason, .. } => {
                    out.finish = Some(reason);
                    break;
                }
                Event::Error(e) => {
                    out.error = Some(e);
                    break;
                }
                Event::QueueTimeout(waited) => {
                    out.error = Some(format!("waited {waited:?} without starting"));
                    break;
                }
            }
        }
        out
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completed {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Option<FinishReason>,
    pub error: Option<String>,
}

/// Live numbers of the scheduler, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    pub steps: AtomicU64,
    /// Sequences and tokens in the last step.
    pub batch_sequences: AtomicU64,
    pub batch_tokens: AtomicU64,
    pub kv_cache_bytes: AtomicU64,
    /// Tokens held in the running sequences' caches.
    pub kv_cache_tokens: AtomicU64,
    /// The most tokens the running batch can hold: `max_running` x `max_context`.
    pub kv_capacity_tokens: AtomicU64,
    /// Adapters of ESFT's typical size that fit the device slots at once.
    pub adapter_capacity: AtomicU64,
    /// Per adapter by qualified name (base = "").
    pub per_adapter: Mutex<HashMap<String, AdapterLoad>>,
    /// Adapter versions resident in device slots.
    pub device_versions: Mutex<Vec<VersionId>>,
    /// Requests refused at `max_waiting` and at `max_waiting_per_tenant`.
    pub rejected_waiting: AtomicU64,
    pub rejected_tenant_waiting: AtomicU64,
    /// Sequences dropped after waiting `max_queue`, and ended at `max_request`.
    pub queue_timeouts: AtomicU64,
    pub request_timeouts: AtomicU64,
}

/// Requests of one adapter in the engine now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AdapterLoad {
    pub running: u64,
    pub waiting: u64,
    /// Whether every tenant may know of it (the base, public adapters).
    pub public: bool,
}

enum Command {
    Submit(Box<Pending>),
    Loaded(Arc<Version>, Result<Arc<AdapterWeights>, AdapterError>),
    /// Frees a version's device slots (refused while in use).
    Unload(Arc<Version>, Sender<Result<bool, AdapterError>>),
    /// Makes a version device-resident now.
    Load(Arc<Version>, Sender<Result<(), String>>),
    Shutdown,
}

struct Pending {
    req: GenerateRequest,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    /// Its place in the waiting count, given back when it starts.
    slot: WaitSlot,
    arrival: Instant,
}

/// Who runs and waits, per tenant, and each tenant's fair share of the running slots, as
/// one admission pass sees them.
#[derive(Default)]
struct Share {
    running: HashMap<Option<String>, usize>,
    waiting: HashMap<Option<String>, usize>,
    each: usize,
}

struct Running {
    pending: Pending,
    seq: Sequence,
}

pub struct Engine {
    tx: Sender<Command>,
    next_id: AtomicU64,
    pub stats: Arc<EngineStats>,
    pub registry: Arc<AdapterRegistry>,
    pub tokenizer: Arc<TextTokenizer>,
    pub config: EngineConfig,
    /// The waiting limits ([`Engine::reserve`]).
    pub admission: Admission,
    vocab_size: usize,
    eos: Vec<u32>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the scheduler thread, which takes ownership of the model.
    pub fn start(
        model: Decoder,
        tokenizer: Arc<TextTokenizer>,
        registry: Arc<AdapterRegistry>,
        config: EngineConfig,
    ) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let slots = DeviceSlots::new(&model, config.device_slot_bytes, registry.stats.clone());
        let capacity = config.max_running.saturating_mul(config.max_context);
        stats
            .kv_capacity_tokens
            .store(capacity as u64, Ordering::Relaxed);
        stats.adapter_capacity.store(
            slots.typical_capacity(model.config()) as u64,
            Ordering::Relaxed,
        );
        let vocab_size = model.config().vocab_size;
        let eos = tokenizer.eos_ids().to_vec();
        let mut sched = Scheduler {
            model,
            slots,
            tokenizer: tokenizer.clone(),
            registry: registry.clone(),
            config: config.clone(),
            rx,
            tx: tx.clone(),
            stats: stats.clone(),
            eos: eos.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            loading: HashSet::new(),
            loaded: HashMap::new(),
            pending_loads: Vec::new(),
            resident: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("esft-scheduler".into())
            .spawn(move || sched.run())
            .ok();
        Arc::new(Self {
            tx,
            next_id: AtomicU64::new(1),
            stats,
            registry,
            tokenizer,
            admission: Admission::new(
                config.max_waiting,
                config.max_waiting_per_tenant,
                RETRY_AFTER,
            ),
            config,
            vocab_size,
            eos,
            thread: Mutex::new(thread),
        })
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Places in the waiting count for `n` sequences of `tenant`, all or none: taken before
    /// any work is spent on a request, so an overloaded engine refuses it at once.
    pub fn reserve(&self, tenant: Option<&str>, n: usize) -> Result<Vec<WaitSlot>, Overload> {
        self.admission.reserve(tenant, n).inspect_err(|o| {
            let counter = match o.reason {
                OverloadReason::Waiting => &self.stats.rejected_waiting,
                OverloadReason::TenantWaiting => &self.stats.rejected_tenant_waiting,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// Checks a request and queues it, taking its place in the waiting count. Errors name
    /// the offending field.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestHandle, SubmitError> {
        let slot = self
            .reserve(req.tenant.as_deref(), 1)?
            .pop()
            .unwrap_or_else(WaitSlot::none);
        self.submit_reserved(req, slot)
    }

    /// [`Engine::submit`] with the place in the waiting count taken before
    /// ([`Engine::reserve`]).
    pub fn submit_reserved(
        &self,
        req: GenerateRequest,
        slot: WaitSlot,
    ) -> Result<RequestHandle, SubmitError> {
        req.params
            .validate()
            .map_err(|(p, m)| SubmitError::Invalid(p, m))?;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("prompt", "the prompt is empty".into()));
        }
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(SubmitError::Invalid(
                "prompt",
                format!(
                    "token id {bad} is out of range (vocab size {})",
                    self.vocab_size
                ),
            ));
        }
        if req.prompt.len() >= self.config.max_context {
            return Err(SubmitError::Invalid(
                "prompt",
                format!(
                    "the prompt has {} tokens; the context is {}",
                    req.prompt.len(),
                    self.config.max_context
                ),
            ));
        }
        let (etx, erx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            arrival: req.arrival.unwrap_or_else(Instant::now),
            req,
            events: etx,
            cancel: cancel.clone(),
            slot,
        };
        self.tx
            .send(Command::Submit(Box::new(pending)))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(RequestHandle {
            id,
            events: erx,
            cancel,
        })
    }

    /// Frees a version's device slots and drops it from host memory; `Ok(false)` if it
    /// was not device-resident. Refused while requests for it run or wait.
    pub fn unload_adapter(&self, v: &Arc<Version>) -> Result<bool, AdapterError> {
        let stopped = || AdapterError::Invalid {
            name: v.name().into(),
            message: "engine stopped".into(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Command::Unload(v.clone(), tx))
            .map_err(|_| stopped())?;
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }

    /// Loads a version into device slots now (blocking).
    pub fn load_adapter(&self, v: &Arc<Version>) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Command::Load(v.clone(), tx))
            .map_err(|_| "engine stopped".to_string())?;
        rx.recv().unwrap_or_else(|_| Err("engine stopped".into()))
    }

    /// Stops the scheduler: running requests are cancelled.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

struct Scheduler {
    model: Decoder,
    slots: DeviceSlots,
    tokenizer: Arc<TextTokenizer>,
    registry: Arc<AdapterRegistry>,
    config: EngineConfig,
    rx: Receiver<Command>,
    tx: Sender<Command>,
    stats: Arc<EngineStats>,
    eos: Vec<u32>,
    waiting: VecDeque<Pending>,
    running: Vec<Running>,
    /// Versions being read from disk by a loader thread.
    loading: HashSet<VersionId>,
    /// Versions read and validated, not yet in device slots.
    loaded: HashMap<VersionId, (Arc<Version>, Arc<AdapterWeights>)>,
    /// `Load` commands waiting for their version.
    pending_loads: Vec<(VersionId, Sender<Result<(), String>>)>,
    /// The versions in device slots.
    resident: HashMap<VersionId, Arc<Version>>,
}

impl Scheduler {
    fn run(&mut self) {
        loop {
            let idle = self.running.is_empty();
            let first = if idle {
                // Nothing to step: wait for work (with a tick to notice cancelled waiters).
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let mut commands: Vec<Command> = first.into_iter().collect();
            commands.extend(self.rx.try_iter());
            for c in commands {
                if !self.handle(c) {
                    self.stop_all();
                    return;
                }
            }
            self.drop_cancelled();
            self.reap_retired();
            self.admit();
            self.step();
            self.publish();
        }
    }

    /// Fails every waiting request and `Load` command of version `id`.
    fn fail_version(&mut self, id: VersionId, msg: &str) {
        self.waiting.retain(|p| {
            let hit = p.req.version() == Some(id);
            if hit {
                let _ = p.events.send(Event::Error(msg.to_string()));
            }
            !hit
        });
        self.pending_loads.retain(|(v, reply)| {
            let hit = *v == id;
            if hit {
                let _ = reply.send(Err(msg.to_string()));
            }
            !hit
        });
    }

    fn is_wanted(&self, id: VersionId) -> bool {
        self.waiting.iter().any(|p| p.req.version() == Some(id))
            || self.pending_loads.iter().any(|(v, _)| *v == id)
    }

    /// Returns false on shutdown.
    fn handle(&mut self, c: Command) -> bool {
        match c {
            Command::Submit(p) => self.waiting.push_back(*p),
            Command::Loaded(v, result) => {
                let id = v.id();
                self.loading.remove(&id);
                match result {
                    Ok(w) => {
                        self.loaded.insert(id, (v, w));
                        self.finish_pending_loads(id);
                    }
                    Err(e) => self.fail_version(id, &e.to_string()),
                }
            }
            Command::Unload(v, reply) => {
                let id = v.id();
                let r = if self.is_wanted(id) {
                    Err(AdapterError::InUse(v.name().to_string()))
                } else {
                    self.slots.remove(&mut self.model, id)
                };
                if r.is_ok() {
                    self.loaded.remove(&id);
                    self.resident.remove(&id);
                    self.registry.forget(id);
                }
                // Published before replying: whoever asks next sees the new state.
                self.publish_device();
                let _ = reply.send(r);
            }
            Command::Load(v, reply) => {
                let id = v.id();
                if self.slots.is_resident(id) {
                    let _ = reply.send(Ok(()));
                } else {
                    self.pending_loads.push((id, reply));
                    if self.loaded.contains_key(&id) {
                        self.finish_pending_loads(id);
                    } else {
                        self.start_load(&v);
                    }
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn finish_pending_loads(&mut self, id: VersionId) {
        if !self.pending_loads.iter().any(|(v, _)| *v == id) {
            return;
        }
        let result = match self.loaded.get(&id).cloned() {
            Some((v, w)) => match self.slots.install(&mut self.model, &w) {
                Ok(Install::Ready(_)) => {
                    self.loaded.remove(&id);
                    self.resident.insert(id, v);
                    Ok(())
                }
                Ok(Install::NoRoom) => {
                    Err("no free device slots: every resident adapter is in use".into())
                }
                Err(e) => Err(e.to_string()),
            },
            None => Err("adapter is not loaded".into()),
        };
        self.publish_device();
        self.pending_loads.retain(|(v, reply)| {
            if *v == id {
                let _ = reply.send(result.clone());
                false
            } else {
                true
            }
        });
    }

    fn start_load(&mut self, v: &Arc<Version>) {
        if !self.loading.insert(v.id()) {
            return;
        }
        let registry = self.registry.clone();
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("esft-adapter-load".into())
            .spawn({
                let v = v.clone();
                move || {
                    let r = registry.load(&v);
                    let _ = tx.send(Command::Loaded(v, r));
                }
            });
        if let Err(e) = spawned {
            let _ = self.tx.send(Command::Loaded(
                v.clone(),
                Err(AdapterError::Io(v.name().to_string(), e)),
            ));
        }
    }

    /// Drops cancelled and timed-out waiters and ends cancelled and overdue sequences.
    fn drop_cancelled(&mut self) {
        self.waiting
            .retain(|p| !p.cancel.load(Ordering::Relaxed) && !p.events.is_closed());
        if let Some(max) = self.config.max_queue {
            let stats = &self.stats;
            self.waiting.retain(|p| {
                let waited = p.arrival.elapsed();
                let late = waited > max;
                if late {
                    stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                    let _ = p.events.send(Event::QueueTimeout(waited));
                }
                !late
            });
        }
        for r in &mut self.running {
            if r.pending.cancel.load(Ordering::Relaxed) || r.pending.events.is_closed() {
                r.seq.cancel();
            } else if self
                .config
                .max_request
                .is_some_and(|max| r.pending.arrival.elapsed() > max)
                && r.seq.end_by_time()
            {
                self.stats.request_timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.retire();
    }

    /// Frees what retired versions hold once no request needs them: device slots (when
    /// their last running sequence has ended) and validated copies nobody waits for.
    fn reap_retired(&mut self) {
        let done: Vec<VersionId> = self
            .resident
            .iter()
            .filter(|(&id, v)| v.is_retired() && self.slots.pins(id) == 0 && !self.is_wanted(id))
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            if matches!(self.slots.remove(&mut self.model, id), Ok(true)) {
                tracing::debug!(version = id, "freed the slots of a retired adapter version");
            }
            self.resident.remove(&id);
            self.registry.forget(id);
        }
        let unwanted: Vec<VersionId> = self
            .loaded
            .iter()
            .filter(|(&id, (v, _))| v.is_retired() && !self.is_wanted(id))
            .map(|(&id, _)| id)
            .collect();
        for id in unwanted {
            self.loaded.remove(&id);
        }
    }

    /// Whether a request of `tenant` may start now: under the hard cap, and under its fair
    /// share unless no other tenant under its own share is waiting.
    fn fair(&self, tenant: &Option<String>, share: &Share) -> bool {
        let running = share.running.get(tenant).copied().unwrap_or(0);
        let cap = self.config.max_running_per_tenant;
        if cap > 0 && running >= cap {
            return false;
        }
        running < share.each
            || !share.waiting.iter().any(|(t, &n)| {
                n > 0 && t != tenant && share.running.get(t).copied().unwrap_or(0) < share.each
            })
    }

    fn admit(&mut self) {
        let mut share = Share::default();
        for r in &self.running {
            *share
                .running
                .entry(r.pending.req.tenant.clone())
                .or_default() += 1;
        }
        for p in &self.waiting {
            *share.waiting.entry(p.req.tenant.clone()).or_default() += 1;
        }
        let active = share
            .running
            .keys()
            .chain(share.waiting.keys())
            .collect::<HashSet<_>>()
            .len();
        share.each = (self.config.max_running / active.max(1)).max(1);
        let mut blocked_for_room: Option<VersionId> = None;
        let mut i = 0;
        while i < self.waiting.len() && self.running.len() < self.config.max_running {
            let tenant = self.waiting[i].req.tenant.clone();
            if !self.fair(&tenant, &share) {
                i += 1;
                continue;
            }
            let adapter = self.waiting[i].req.adapter.clone();
            let map: Option<Arc<ExpertMap>> = match &adapter {
                None => None,
                Some(v) => {
                    let id = v.id();
                    if blocked_for_room.is_some_and(|b| b != id) {
                        i += 1;
                        continue;
                    }
                    match self.slots.lookup(id) {
                        Some(m) => Some(m),
                        None => match self.loaded.get(&id).cloned() {
                            None => {
                                self.start_load(v);
                                i += 1;
                                continue;
                            }
                            Some((v, w)) => match self.slots.install(&mut self.model, &w) {
                                Ok(Install::Ready(m)) => {
                                    self.loaded.remove(&id);
                                    self.resident.insert(id, v);
                                    Some(m)
                                }
                                Ok(Install::NoRoom) => {
                                    blocked_for_room.get_or_insert(id);
                                    i += 1;
                                    continue;
                                }
                                Err(e) => {
                                    self.loaded.remove(&id);
                                    self.fail_version(id, &e.to_string());
                                    continue;
                                }
                            },
                        },
                    }
                }
            };
            let Some(mut p) = self.waiting.remove(i) else {
                break;
            };
            p.slot.release();
            if let Some(v) = &adapter {
                self.slots.pin(v.id());
            }
            if let Some(n) = share.waiting.get_mut(&tenant) {
                *n = n.saturating_sub(1);
            }
            *share.running.entry(tenant).or_default() += 1;
            let mut seq = Sequence::new(
                p.req.prompt.clone(),
                p.req.params.clone(),
                self.model.new_cache(),
                &self.eos,
                self.config.max_context,
            );
            seq.experts = map;
            self.running.push(Running { pending: p, seq });
        }
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        // Decoding sequences take one token each; prefill chunks share what is left.
        let decoding = self
            .running
            .iter()
            .filter(|r| !r.seq.is_prefilling())
            .count();
        let mut left = self.config.max_batch_tokens.saturating_sub(decoding);
        let budgets: Vec<usize> = self
            .running
            .iter()
            .map(|r| {
                if r.seq.is_prefilling() {
                    let b = left.min(self.config.prefill_chunk);
                    left -= b;
                    b
                } else {
                    1
                }
            })
            .collect();
        let tokens: usize = self
            .running
            .iter()
            .zip(&budgets)
            .map(|(r, &b)| {
                if r.seq.is_prefilling() {
                    b.min(r.seq.prompt().len())
                } else {
                    b
                }
            })
            .sum();
        let mut seqs: Vec<&mut Sequence> = self.running.iter_mut().map(|r| &mut r.seq).collect();
        let result = step(&self.model, Some(&self.tokenizer), &mut seqs, &budgets);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.batch_sequences.store(
            budgets.iter().filter(|&&b| b > 0).count() as u64,
            Ordering::Relaxed,
        );
        self.stats
            .batch_tokens
            .store(tokens as u64, Ordering::Relaxed);
        match result {
            Ok(events) => {
                for (r, ev) in self.running.iter_mut().zip(events) {
                    if let Some(ev) = ev {
                        if r.pending.events.send(Event::Token(ev)).is_err() {
                            r.seq.cancel();
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!("model step failed: {e}");
                for r in &mut self.running {
                    let _ = r
                        .pending
                        .events
                        .send(Event::Error(format!("model step failed: {e}")));
                    r.seq.cancel();
                }
            }
        }
        self.retire();
    }

    /// Removes finished sequences, reporting their end and unpinning their adapters.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if let Some(reason) = self.running[i].seq.finish_reason() {
                // `remove`, not `swap_remove`: the running list stays in admission order,
                // which is the order prefill budgets are handed out in.
                let r = self.running.remove(i);
                let _ = r.pending.events.send(Event::Finished {
                    reason,
                    prompt_tokens: r.seq.prompt().len(),
                    completion_tokens: r.seq.generated().len(),
                });
                if let Some(id) = r.pending.req.version() {
                    self.slots.unpin(id);
                }
            } else {
                i += 1;
            }
        }
    }

    fn stop_all(&mut self) {
        for r in &mut self.running {
            r.seq.cancel();
        }
        self.retire();
        for p in self.waiting.drain(..) {
            let _ = p.events.send(Event::Finished {
                reason: FinishReason::Cancelled,
                prompt_tokens: p.req.prompt.len(),
                completion_tokens: 0,
            });
        }
    }

    fn publish_device(&self) {
        if let Ok(mut d) = self.stats.device_versions.lock() {
            d.clear();
            d.extend(self.slots.resident_versions());
            d.sort();
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        s.waiting
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        let kv: usize = self
            .running
            .iter()
            .map(|r| r.seq.cache.capacity_bytes())
            .sum();
        s.kv_cache_bytes.store(kv as u64, Ordering::Relaxed);
        let tokens: usize = self.running.iter().map(|r| r.seq.cache.len()).sum();
        s.kv_cache_tokens.store(tokens as u64, Ordering::Relaxed);
        self.publish_device();
        if let Ok(mut m) = s.per_adapter.lock() {
            m.clear();
            let rows = (self.running.iter().map(|r| (&r.pending.req, true)))
                .chain(self.waiting.iter().map(|p| (&p.req, false)));
            for (req, running) in rows {
                let (key, public) = match &req.adapter {
                    Some(v) => (v.qualified(), v.is_public()),
                    None => (String::new(), true),
                };
                let e = m.entry(key).or_default();
                e.public = public;
                if running {
                    e.running += 1;
                } else {
                    e.waiting += 1;
                }
            }
        }
    }
}
