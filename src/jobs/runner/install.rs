//! The adapter a job makes: what its selection trains ([`selection_summary`]), and its
//! install into the owner's namespace of the adapter store once it is checked as serving
//! would check it, under a lease just renewed, with the job's success recorded after it
//! (and the adapter taken away again when that record loses to a cancel).

use serde_json::{json, Value};
use std::path::Path;

use super::stop::{internal, no_room, persist, unavailable, Stop};
use crate::adapter::{AdapterError, AdapterKey, AdapterRegistry, ExpertConfig};
use crate::jobs::adapter_quota::{AdapterQuota, QuotaError};
use crate::jobs::queue::{EsftChoices, JobError, JobRecord, JobStore, Lease, Renewal, Status};

/// Where an adapter goes and what it may be.
pub struct Install<'a> {
    pub registry: &'a AdapterRegistry,
    pub jobs: &'a JobStore,
    /// The owner's adapter quota.
    pub quota: &'a AdapterQuota,
    /// Bytes of expert slots an adapter may need (the server's budget).
    pub slot_budget: usize,
    /// Free disk space the install must leave in the adapters directory.
    pub min_free_disk_bytes: u64,
    /// The job's holder and its lease's duration.
    pub lease: Lease,
    /// Why the job must stop, if it must.
    pub stopped: &'a dyn Fn() -> Option<Stop>,
}

impl Install<'_> {
    /// Installs the adapter in `out` as the job's, then records the job's success with
    /// `trained_tokens`.
    pub fn run(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        out: &Path,
        trained_tokens: i64,
    ) -> Result<(), Stop> {
        let key = AdapterKey {
            tenant: job.owner.clone(),
            name: job.adapter.clone(),
        };
        let registry = self.registry;
        registry
            .check_servable(out, &job.adapter, self.slot_budget)
            .map_err(|e| Stop::Failed(JobError::new("invalid_adapter", e)))?;
        let bytes = crate::adapter::store::adapter_bytes(out);
        if let Err(free) =
            crate::util::room_for(registry.store.root(), bytes, self.min_free_disk_bytes)
        {
            return Err(Stop::Failed(no_room(
                &format!("installing the adapter ({bytes} bytes)"),
                free,
            )));
        }
        // Room in the owner's adapter quota, held until the install ends.
        let held = rt
            .block_on(
                self.quota
                    .reserve(job.owner.as_deref(), &job.adapter, bytes),
            )
            .map_err(|e| match e {
                e @ (QuotaError::Count { .. } | QuotaError::Bytes { .. }) => {
                    Stop::Failed(JobError::new("quota_exceeded", e.to_string()))
                }
                QuotaError::Db(e) => internal("reserving the adapter quota", e),
            })?;
        let give_back = |held: crate::jobs::adapter_quota::AdapterReservation| {
            if let Err(e) = rt.block_on(held.cancel()) {
                tracing::warn!(job = %job.id, "giving back an adapter quota reservation: {e}; it lapses in an hour");
            }
        };
        let staged = registry
            .store
            .staging()
            .map_err(|e| internal("creating a staging directory", e))
            .and_then(|staging| {
                copy_files(out, &staging.dir()).map_err(|e| internal("staging the adapter", e))?;
                Ok(staging)
            });
        let staging = match staged {
            Ok(s) => s,
            Err(stop) => {
                give_back(held);
                return Err(stop);
            }
        };
        let within = self.lease.duration;
        // A lease just renewed: no other worker can take the job over while it installs.
        let renewed = match persist(rt, within, "renewing the lease", || {
            self.jobs.renew(&job.id, &self.lease)
        }) {
            Ok(Renewal::Held) => (self.stopped)().map_or(Ok(()), Err),
            Ok(Renewal::Cancelled) => Err(Stop::Cancelled),
            Ok(Renewal::Lost) => Err(Stop::Lost),
            Err(e) => {
                tracing::error!(
                    "renewing the lease of job {} before installing: {e}",
                    job.id
                );
                Err(Stop::Lost)
            }
        };
        if let Err(stop) = renewed {
            give_back(held);
            return Err(stop);
        }
        // The adapter's name carries the job's id: a version already there is this job's,
        // from a worker that installed it and died before recording the success.
        let done = match registry.install(&key, staging, false) {
            Ok(done) => done,
            Err(e) => {
                give_back(held);
                return Err(match e {
                    AdapterError::StoreUnavailable(_) => unavailable("publishing the adapter", e),
                    e => internal("installing the adapter", e),
                });
            }
        };
        // Counted from now on (where that cannot be written, the quotas are corrected when
        // a server next starts).
        if let Err(e) = held.settle_blocking(rt) {
            tracing::warn!(job = %job.id, "settling an adapter quota reservation: {e}");
        }
        let ours = done.version.id();
        let holder = self.lease.worker.as_str();
        let succeeded = persist(rt, within, "recording the job's success", || {
            self.jobs
                .succeed(&job.id, holder, &job.adapter, trained_tokens)
        });
        if let Ok(true) = succeeded {
            tracing::info!(job = %job.id, adapter = %key, version = ours, "fine-tuned adapter installed");
            return Ok(());
        }
        // Cancelled or taken over while it installed (or the record could not be written):
        // the adapter goes again, unless another version replaced it meanwhile.
        if let Err(e) = &succeeded {
            tracing::error!("recording the success of job {}: {e}", job.id);
        }
        if registry.store.resolve(&key).map(|v| v.id()) == Some(ours) {
            if let Err(e) = registry.delete(&key) {
                tracing::error!("removing the adapter of job {}: {e}", job.id);
            } else if let Err(e) =
                rt.block_on(self.quota.release(job.owner.as_deref(), &job.adapter))
            {
                tracing::warn!(job = %job.id, "releasing a removed adapter's quota: {e}");
            }
        }
        match succeeded {
            Ok(_) => match rt.block_on(self.jobs.status(&job.id)) {
                Ok(Some(Status::Cancelled)) => Err(Stop::Cancelled),
                _ => Err(Stop::Lost),
            },
            Err(e) => Err(internal("recording the job's success", e)),
        }
    }
}

/// The selection `select` wrote to `path`.
pub fn read_expert_config(path: &Path) -> Result<ExpertConfig, Stop> {
    let text = std::fs::read_to_string(path).map_err(|e| internal("reading the selection", e))?;
    serde_json::from_str(&text).map_err(|e| internal("reading the selection", e))
}

/// What a selection trains: the experts per layer, how many of how many, the trainable
/// parameters and the adapter's size (f32 tensors).
pub fn selection_summary(
    ec: &ExpertConfig,
    registry: &AdapterRegistry,
    esft: &EsftChoices,
) -> Value {
    let cfg = &registry.base.config;
    let layers = cfg.moe_layers().count();
    let total = layers * cfg.n_routed_experts;
    let selected = ec.expert_count();
    let params = ec.trainable_params(&registry.base);
    let per_layer: serde_json::Map<String, Value> = ec
        .experts
        .iter()
        .map(|(l, e)| (l.to_string(), json!(e)))
        .collect();
    json!({
        "score_function": esft.score_function.as_str(),
        "top_p": esft.top_p,
        "experts": per_layer,
        "selected_experts": selected,
        "total_experts": total,
        "share": if total == 0 { 0.0 } else { selected as f64 / total as f64 },
        "train_shared_experts": ec.shared_experts,
        "train_non_expert_modules": ec.non_expert_modules,
        "trainable_params": params,
        "adapter_bytes": params * 4,
    })
}

/// A selection summary in a sentence.
pub fn describe_selection(summary: &Value) -> String {
    let n = summary["selected_experts"].as_u64().unwrap_or(0);
    let total = summary["total_experts"].as_u64().unwrap_or(0);
    format!(
        "Selected {n} of {total} routed experts ({:.1}%): {} trainable parameters, an adapter of {} bytes",
        100.0 * summary["share"].as_f64().unwrap_or(0.0),
        summary["trainable_params"].as_u64().unwrap_or(0),
        summary["adapter_bytes"].as_u64().unwrap_or(0),
    )
}

/// Copies the files of the flat directory `from` into `to`, each fsynced.
fn copy_files(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let dest = to.join(entry.file_name());
            std::fs::copy(entry.path(), &dest)?;
            std::fs::File::open(&dest)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_reads_as_a_sentence() {
        let summary = json!({"selected_experts": 6, "total_experts": 64, "share": 6.0 / 64.0,
            "trainable_params": 1000, "adapter_bytes": 4000});
        assert_eq!(
            describe_selection(&summary),
            "Selected 6 of 64 routed experts (9.4%): 1000 trainable parameters, an adapter of 4000 bytes"
        );
    }

    #[test]
    fn copies_are_flat_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(from.join("nested")).unwrap();
        std::fs::write(from.join("adapter.safetensors"), b"t").unwrap();
        std::fs::write(from.join("manifest.json"), b"{}").unwrap();
        copy_files(&from, &to).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["adapter.safetensors", "manifest.json"]);
        std::fs::write(dir.path().join("experts.json"), b"not json").unwrap();
        assert!(read_expert_config(&dir.path().join("experts.json")).is_err());
    }
}
