//! Counters of the adapter tiers, read by the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Disk,
    Host,
    Device,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Disk, Tier::Host, Tier::Device];

    pub fn label(self) -> &'static str {
        match self {
            Tier::Disk => "disk",
            Tier::Host => "host",
            Tier::Device => "device",
        }
    }
}

#[derive(Debug, Default)]
pub struct TierCounters {
    pub lookups: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub loads: AtomicU64,
    pub evictions: AtomicU64,
    pub load_failures: AtomicU64,
    /// Adapters and bytes resident in the tier now.
    pub resident: AtomicU64,
    pub resident_bytes: AtomicU64,
}

#[derive(Debug, Default)]
pub struct AdapterStats {
    pub disk: TierCounters,
    pub host: TierCounters,
    pub device: TierCounters,
    /// Sum of seconds spent making adapters servable (disk read + validation), and count.
    pub load_seconds_sum_micros: AtomicU64,
    pub load_count: AtomicU64,
    /// Device expert slots: used (adapter copies) and total (base + what the budget allows).
    pub device_slots_used: AtomicU64,
    pub device_slots_total: AtomicU64,
}

impl AdapterStats {
    pub fn tier(&self, t: Tier) -> &TierCounters {
        match t {
            Tier::Disk => &self.disk,
            Tier::Host => &self.host,
            Tier::Device => &self.device,
        }
    }

    pub fn lookup(&self, t: Tier, hit: bool) {
        let c = self.tier(t);
        c.lookups.fetch_add(1, Ordering::Relaxed);
        if hit {
            c.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            c.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
