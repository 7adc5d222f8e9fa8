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

/// Upper bounds of the adapter load duration histogram, in seconds.
pub const LOAD_SECONDS_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
pub struct AdapterStats {
    pub disk: TierCounters,
    pub host: TierCounters,
    pub device: TierCounters,
    /// Sum of seconds spent making adapters servable (disk read + validation), and count.
    pub load_seconds_sum_micros: AtomicU64,
    pub load_count: AtomicU64,
    /// Loads that took at most `LOAD_SECONDS_BUCKETS[i]` seconds (not cumulative).
    pub load_seconds_buckets: [AtomicU64; LOAD_SECONDS_BUCKETS.len()],
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

    /// Records one successful load that took `seconds`.
    pub fn record_load(&self, seconds: f64) {
        self.load_seconds_sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.load_count.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = LOAD_SECONDS_BUCKETS.iter().position(|&b| seconds <= b) {
            self.load_seconds_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
