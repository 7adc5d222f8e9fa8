//! Backpressure: how many requests may wait for the engine, in all and per tenant.
//!
//! A request takes a [`WaitSlot`] per sequence before any work is spent on it (before its
//! prompt is tokenized); past `max_waiting` or `max_waiting_per_tenant` it is refused at
//! once ([`Overload`]) instead of queueing without bound. A slot is given back when its
//! sequence starts running, or when it is dropped (refused, cancelled, timed out), so
//! the counts are exactly the sequences accepted and not yet running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which waiting limit a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverloadReason {
    /// `max_waiting`: the engine's whole queue is full.
    Waiting,
    /// `max_waiting_per_tenant`: the caller's tenant has its share queued.
    TenantWaiting,
}

impl OverloadReason {
    /// The label of `esft_requests_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            OverloadReason::Waiting => "max_waiting",
            OverloadReason::TenantWaiting => "max_waiting_per_tenant",
        }
    }
}

/// A request refused because too many are waiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server is overloaded: {waiting} sequences are waiting{}, the limit is {limit}; retry after {} s", match .reason { OverloadReason::TenantWaiting => " for this tenant", OverloadReason::Waiting => "" }, .retry_after.as_secs())]
pub struct Overload {
    pub reason: OverloadReason,
    pub waiting: usize,
    pub limit: usize,
    /// When a retry may find room.
    pub retry_after: Duration,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_tenant: HashMap<Option<String>, usize>,
}

/// The waiting limits and the live counts; shared by the server (which takes slots) and
/// the scheduler (which gives them back as sequences start).
pub struct Admission {
    max_waiting: usize,
    max_per_tenant: usize,
    retry_after: Duration,
    counts: Arc<Mutex<Counts>>,
}

impl Admission {
    /// `0` for either limit: no limit.
    pub fn new(max_waiting: usize, max_per_tenant: usize, retry_after: Duration) -> Self {
        Self {
            max_waiting,
            max_per_tenant,
            retry_after,
            counts: Arc::default(),
        }
    }

    /// `n` slots for sequences of `tenant`, all or none.
    pub fn reserve(&self, tenant: Option<&str>, n: usize) -> Result<Vec<WaitSlot>, Overload> {
        let tenant = tenant.map(str::to_string);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.by_tenant.get(&tenant).copied().unwrap_or(0);
        let over = |limit: usize, waiting: usize, reason| {
            (limit > 0 && waiting + n > limit).then_some(Overload {
                reason,
                waiting,
                limit,
                retry_after: self.retry_after,
            })
        };
        if let Some(o) = over(self.max_waiting, c.total, OverloadReason::Waiting)
            .or_else(|| over(self.max_per_tenant, mine, OverloadReason::TenantWaiting))
        {
            return Err(o);
        }
        c.total += n;
        *c.by_tenant.entry(tenant.clone()).or_default() += n;
        drop(c);
        Ok((0..n)
            .map(|_| WaitSlot {
                counts: Some(self.counts.clone()),
                tenant: tenant.clone(),
            })
            .collect())
    }

    /// Sequences holding a slot now (all tenants).
    pub fn waiting(&self) -> usize {
        self.counts.lock().map_or(0, |c| c.total)
    }

    /// Sequences of `tenant` holding a slot now.
    pub fn waiting_for(&self, tenant: Option<&str>) -> usize {
        self.counts.lock().map_or(0, |c| {
            c.by_tenant
                .get(&tenant.map(str::to_string))
                .copied()
                .unwrap_or(0)
        })
    }
}

/// One sequence's place in the waiting count, given back by [`WaitSlot::release`] or when
/// dropped.
pub struct WaitSlot {
    counts: Option<Arc<Mutex<Counts>>>,
    tenant: Option<String>,
}

impl WaitSlot {
    /// A slot that counts nothing (for a request submitted without taking one first).
    pub fn none() -> Self {
        Self {
            counts: None,
            tenant: None,
        }
    }

    /// Gives the place back (the sequence started running); later calls do nothing.
    pub fn release(&mut self) {
        if let Some(counts) = self.counts.take() {
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.by_tenant.get_mut(&self.tenant) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_tenant.remove(&self.tenant);
                }
            }
        }
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for WaitSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitSlot")
            .field("held", &self.counts.is_some())
            .field("tenant", &self.tenant)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_until_released_or_dropped_and_limits_hold_all_or_none() {
        let a = Admission::new(5, 3, Duration::from_secs(2));
        let mut acme = a.reserve(Some("acme"), 3).unwrap();
        assert_eq!((a.waiting(), a.waiting_for(Some("acme"))), (3, 3));
        // The tenant's limit: one more of acme's is refused, nothing is taken.
        let e = a.reserve(Some("acme"), 1).unwrap_err();
        assert_eq!(e.reason, OverloadReason::TenantWaiting);
        assert_eq!((e.waiting, e.limit, e.retry_after.as_secs()), (3, 3, 2));
        // The whole limit: 3 + 3 > 5, refused whole (not 2 of 3 taken).
        let e = a.reserve(Some("globex"), 3).unwrap_err();
        assert_eq!(e.reason, OverloadReason::Waiting);
        assert_eq!(a.waiting_for(Some("globex")), 0);
        let globex = a.reserve(Some("globex"), 2).unwrap();
        assert!(a.reserve(None, 1).is_err());
        // Released (the sequence runs) and dropped both give the place back, once.
        acme[0].release();
        acme[0].release();
        assert_eq!(a.waiting(), 4);
        drop(acme);
        assert_eq!((a.waiting(), a.waiting_for(Some("acme"))), (2, 0));
        let _none = a.reserve(None, 3).unwrap();
        drop(globex);
        assert_eq!(a.waiting(), 3);
        // Zero: no limit.
        let open = Admission::new(0, 0, Duration::ZERO);
        assert_eq!(open.reserve(Some("t"), 10_000).unwrap().len(), 10_000);
        assert_eq!(open.waiting(), 0);
        // A slot taken without an admission counts nothing.
        WaitSlot::none().release();
    }
}
