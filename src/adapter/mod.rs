//! What an adapter is and where it lives: the on-disk format, the disk tier (the adapters
//! directory, its namespaces and versions), the host tier (a byte-budget cache) and the
//! device tier (expert slots). Every tier above the disk is keyed by version, not name.

pub mod format;
pub mod merge;
pub mod registry;
pub mod remote;
pub mod slots;
pub mod stats;
pub mod store;

pub use format::{
    load_adapter, AdapterError, AdapterWeights, BaseModel, ExpertConfig, Manifest, VersionId,
};
pub use registry::{AdapterRegistry, CacheSettings};
pub use slots::{apply_adapter_dir, DeviceSlots, Install};
pub use stats::{AdapterStats, Tier};
pub use store::{AdapterKey, AdapterStore, Installed, Policy, Staging, Version};
