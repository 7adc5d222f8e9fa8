//! The device tier: adapter experts copied into expert slots of the model's MoE layers,
//! under a byte budget, keyed by version id (two versions of one name are two residents).
//! A version used by a running sequence is pinned; when room is needed the least recently
//! used unpinned version is evicted.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::format::{AdapterError, AdapterWeights, VersionId};
use super::stats::{AdapterStats, Tier};
use crate::model::{Decoder, ExpertMap};

struct Resident {
    name: String,
    map: Arc<ExpertMap>,
    routed: Vec<(usize, usize)>,
    shared: Vec<(usize, usize)>,
    bytes: usize,
    pins: usize,
    last_used: u64,
}

/// Result of asking for an adapter's slots.
pub enum Install {
    Ready(Arc<ExpertMap>),
    /// Every resident adapter that could make room is pinned: try again later.
    NoRoom,
}

pub struct DeviceSlots {
    budget_bytes: usize,
    /// Bytes of one base routed expert.
    expert_bytes: usize,
    used_bytes: usize,
    resident: HashMap<VersionId, Resident>,
    /// Free routed / shared slot indices per model layer.
    free_routed: HashMap<usize, Vec<usize>>,
    free_shared: HashMap<usize, Vec<usize>>,
    clock: u64,
    stats: Arc<AdapterStats>,
}

impl DeviceSlots {
    pub fn new(model: &Decoder, budget_bytes: usize, stats: Arc<AdapterStats>) -> Self {
        let cfg = model.config();
        let expert_bytes = cfg
            .moe_layers()
            .next()
            .and_then(|l| model.moe(l)?.slot(0).map(|m| m.size_bytes()))
            .unwrap_or(1)
            .max(1);
        let base_slots = cfg.n_routed_experts * cfg.moe_layers().len();
        stats.device_slots_total.store(
            (base_slots + budget_bytes / expert_bytes) as u64,
            Ordering::Relaxed,
        );
        stats
            .device_slots_used
            .store(base_slots as u64, Ordering::Relaxed);
        Self {
            budget_bytes,
            expert_bytes,
            used_bytes: 0,
            resident: HashMap::new(),
            free_routed: HashMap::new(),
            free_shared: HashMap::new(),
            clock: 0,
            stats,
        }
    }

    /// How many adapters of ESFT's typical size (a tenth of every MoE layer's routed
    /// experts, at least one) fit in the budget at once: the `max_lora` an inference
    /// gateway is told.
    pub fn typical_capacity(&self, cfg: &crate::model::Config) -> usize {
        let per_layer = cfg.n_routed_experts.div_ceil(10).max(1);
        let adapter = per_layer * cfg.moe_layers().len().max(1) * self.expert_bytes;
        self.budget_bytes / adapter.max(1)
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    pub fn is_resident(&self, id: VersionId) -> bool {
        self.resident.contains_key(&id)
    }

    pub fn resident_versions(&self) -> Vec<VersionId> {
        self.resident.keys().copied().collect()
    }

    pub fn pins(&self, id: VersionId) -> usize {
        self.resident.get(&id).map_or(0, |r| r.pins)
    }

    /// The map of a resident version (a device-tier lookup).
    pub fn lookup(&mut self, id: VersionId) -> Option<Arc<ExpertMap>> {
        self.clock += 1;
        let clock = self.clock;
        let hit = self.resident.get_mut(&id).map(|r| {
            r.last_used = clock;
            r.map.clone()
        });
        self.stats.lookup(Tier::Device, hit.is_some());
        hit
    }

    pub fn pin(&mut self, id: VersionId) {
        if let Some(r) = self.resident.get_mut(&id) {
            r.pins += 1;
        }
    }

    pub fn unpin(&mut self, id: VersionId) {
        if let Some(r) = self.resident.get_mut(&id) {
            r.pins = r.pins.saturating_sub(1);
        }
    }

    /// Copies `w`'s experts into free slots (evicting idle adapters as needed).
    pub fn install(
        &mut self,
        model: &mut Decoder,
        w: &AdapterWeights,
    ) -> Result<Install, AdapterError> {
        if let Some(map) = self.lookup(w.version) {
            return Ok(Install::Ready(map));
        }
        if !w.others.is_empty() {
            return Err(AdapterError::Invalid {
                name: w.name.clone(),
                message: "it replaces non-expert modules, which cannot be served per request in a \
                          shared batch; merge it into a checkpoint with `esft-train merge`"
                    .into(),
            });
        }
        let needed = w.slot_bytes();
        if needed > self.budget_bytes {
            return Err(AdapterError::TooLarge {
                name: w.name.clone(),
                needed,
                budget: self.budget_bytes,
            });
        }
        while self.used_bytes + needed > self.budget_bytes {
            if !self.evict_lru(model) {
                return Ok(Install::NoRoom);
            }
        }
        let mut map = ExpertMap::identity(model.config());
        let device = model.device().clone();
        let mut routed = Vec::with_capacity(w.experts.len());
        let mut shared = Vec::with_capacity(w.shared.len());
        for (layer, expert, mlp) in &w.experts {
            let moe = model.moe_mut(*layer).ok_or_else(|| invalid(w, *layer))?;
            let slot = self
                .free_routed
                .get_mut(layer)
                .and_then(Vec::pop)
                .unwrap_or_else(|| moe.slot_count());
            moe.set_slot(slot, Some(to_device(mlp, &device, w)?));
            map.set(*layer, *expert, slot as u32);
            routed.push((*layer, slot));
        }
        for (layer, mlp) in &w.shared {
            let moe = model.moe_mut(*layer).ok_or_else(|| invalid(w, *layer))?;
            let slot = self
                .free_shared
                .get_mut(layer)
                .and_then(Vec::pop)
                .unwrap_or_else(|| moe.shared_slot_count());
            moe.set_shared_slot(slot, Some(to_device(mlp, &device, w)?));
            map.set_shared(*layer, slot as u32);
            shared.push((*layer, slot));
        }
        self.used_bytes += needed;
        self.clock += 1;
        let map = Arc::new(map);
        self.stats
            .device_slots_used
            .fetch_add(routed.len() as u64, Ordering::Relaxed);
        self.resident.insert(
            w.version,
            Resident {
                name: w.name.clone(),
                map: map.clone(),
                routed,
                shared,
                bytes: needed,
                pins: 0,
                last_used: self.clock,
            },
        );
        self.stats.device.loads.fetch_add(1, Ordering::Relaxed);
        self.publish();
        Ok(Install::Ready(map))
    }

    /// Evicts the least recently used unpinned adapter; false when there is none.
    fn evict_lru(&mut self, model: &mut Decoder) -> bool {
        let victim = self
            .resident
            .iter()
            .filter(|(_, r)| r.pins == 0)
            .min_by_key(|(_, r)| r.last_used)
            .map(|(&id, _)| id);
        match victim {
            Some(id) => self.remove(model, id).is_ok(),
            None => false,
        }
    }

    /// Frees a version's slots; refused while it is pinned.
    pub fn remove(&mut self, model: &mut Decoder, id: VersionId) -> Result<bool, AdapterError> {
        match self.resident.get(&id) {
            None => return Ok(false),
            Some(r) if r.pins > 0 => return Err(AdapterError::InUse(r.name.clone())),
            Some(_) => {}
        }
        let Some(r) = self.resident.remove(&id) else {
            return Ok(false);
        };
        for &(layer, slot) in &r.routed {
            if let Some(moe) = model.moe_mut(layer) {
                moe.set_slot(slot, None);
            }
            self.free_routed.entry(layer).or_default().push(slot);
        }
        for &(layer, slot) in &r.shared {
            if let Some(moe) = model.moe_mut(layer) {
                moe.set_shared_slot(slot, None);
            }
            self.free_shared.entry(layer).or_default().push(slot);
        }
        self.used_bytes -= r.bytes;
        self.stats
            .device_slots_used
            .fetch_sub(r.routed.len() as u64, Ordering::Relaxed);
        self.stats.device.evictions.fetch_add(1, Ordering::Relaxed);
        self.publish();
        Ok(true)
    }

    fn publish(&self) {
        let d = &self.stats.device;
        d.resident
            .store(self.resident.len() as u64, Ordering::Relaxed);
        d.resident_bytes
            .store(self.used_bytes as u64, Ordering::Relaxed);
    }
}

fn invalid(w: &AdapterWeights, layer: usize) -> AdapterError {
    AdapterError::Invalid {
        name: w.name.clone(),
        message: format!("layer {layer} is not a MoE layer"),
    }
}

fn to_device(
    mlp: &crate::model::moe::Mlp,
    device: &candle_core::Device,
    w: &AdapterWeights,
) -> Result<crate::model::moe::Mlp, AdapterError> {
    let err = |e: candle_core::Error| AdapterError::Invalid {
        name: w.name.clone(),
        message: e.to_string(),
    };
    Ok(crate::model::moe::Mlp {
        gate_up: mlp.gate_up.to_device(device).map_err(err)?,
        down: mlp.down.to_device(device).map_err(err)?,
    })
}

/// Loads the adapter in `dir` (validated against `loaded`'s base) into expert slots of
/// `loaded.model` and returns the expert map that selects it: for one-off runs (the CLI,
/// evaluation) that apply one adapter to a private model.
pub fn apply_adapter_dir(
    loaded: &mut crate::model::LoadedModel,
    dir: &std::path::Path,
    dtype: candle_core::DType,
) -> Result<Arc<ExpertMap>, AdapterError> {
    let base = super::BaseModel::new(loaded.model.config().clone(), loaded.store.clone());
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| super::format::validate_name(n).is_ok())
        .unwrap_or("adapter");
    let weights = super::load_adapter(dir, name, &base, dtype)?;
    let mut slots = DeviceSlots::new(&loaded.model, usize::MAX, Arc::new(AdapterStats::default()));
    match slots.install(&mut loaded.model, &weights)? {
        Install::Ready(map) => Ok(map),
        Install::NoRoom => Err(AdapterError::TooLarge {
            name: name.into(),
            needed: weights.slot_bytes(),
            budget: usize::MAX,
        }),
    }
}
