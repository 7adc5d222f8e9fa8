//! A job's work and the object store: with a store the work directory is only a cache.
//! The training files come from the store, the scores and selection go up to
//! `jobs/<id>/`, every saved state goes up to `jobs/<id>/checkpoints/<step>/` before its
//! checkpoint is recorded, and a worker that takes a job over fetches the selection and
//! the newest recorded checkpoint first. Without a store all of it stays under the data
//! directory.

use std::path::{Path, PathBuf};

use super::stop::{internal, unavailable, Stop};
use crate::jobs::contract::{
    state_step, EXPERTS_FILE, SCORES_FILE, STATE_FILE, TRAINING_FILE, VALIDATION_FILE,
};
use crate::jobs::files::{object_key, FileStore};
use crate::jobs::queue::{JobError, JobRecord};
use crate::store::{Store, StoreError};

/// The work directories of jobs inside the data directory, and the prefix of their work
/// in the object store.
pub const JOBS_DIR: &str = "jobs";

/// The key of a job's work file `name` in the object store.
fn work_key(job_id: &str, name: &str) -> String {
    format!("{JOBS_DIR}/{job_id}/{name}")
}

/// The prefix of a job's saved state at `step` in the object store.
fn checkpoint_prefix(job_id: &str, step: i64) -> String {
    format!("{JOBS_DIR}/{job_id}/checkpoints/{step}")
}

/// The training and validation files' local paths: the data directory's copies, or
/// with an object store, copies fetched into the work directory `dir`.
pub fn data_files(
    files: &FileStore,
    job: &JobRecord,
    dir: &Path,
    rt: &tokio::runtime::Handle,
) -> Result<(PathBuf, Option<PathBuf>), Stop> {
    let Some(store) = files.store() else {
        return Ok((
            files.blob_path(&job.training_file),
            job.validation_file.as_ref().map(|f| files.blob_path(f)),
        ));
    };
    let fetch = |id: &str, name: &str| -> Result<PathBuf, Stop> {
        let dest = dir.join(name);
        if dest.exists() {
            return Ok(dest);
        }
        match rt.block_on(store.download_file(&object_key(id), &dest)) {
            Ok(Some(_)) => Ok(dest),
            Ok(None) => Err(Stop::Failed(JobError::new(
                "file_not_found",
                format!("the bytes of the file {id} are missing from the store"),
            ))),
            Err(e) => Err(unavailable("fetching the job's files from the store", e)),
        }
    };
    let training = fetch(&job.training_file, TRAINING_FILE)?;
    let validation = job
        .validation_file
        .as_ref()
        .map(|v| fetch(v, VALIDATION_FILE))
        .transpose()?;
    Ok((training, validation))
}

/// Fills a fresh work directory `dir` from the store: the scores and selection, and the
/// newest of the recorded checkpoints `steps` (highest first) whose state is stored,
/// into `state`. Returns that checkpoint's step.
pub fn restore(
    store: &Store,
    job_id: &str,
    steps: &[i64],
    dir: &Path,
    state: &Path,
    rt: &tokio::runtime::Handle,
) -> Result<Option<i64>, Stop> {
    for name in [SCORES_FILE, EXPERTS_FILE] {
        rt.block_on(store.download_file(&work_key(job_id, name), &dir.join(name)))
            .map_err(|e| unavailable("fetching the job's selection from the store", e))?;
    }
    let state_file = format!("/{STATE_FILE}");
    for &step in steps {
        let prefix = checkpoint_prefix(job_id, step);
        let entries = rt
            .block_on(store.list(&prefix))
            .map_err(|e| unavailable("listing the job's checkpoints in the store", e))?;
        if !entries.iter().any(|e| e.key.ends_with(&state_file)) {
            // The record of the end of training (no state of its own), or a state
            // already removed.
            continue;
        }
        let staged = tempfile::Builder::new()
            .prefix(".restore-")
            .tempdir_in(dir)
            .map_err(|e| internal("restoring a checkpoint", e))?;
        for entry in &entries {
            let name = entry.key.rsplit('/').next().unwrap_or_default();
            rt.block_on(store.download_file(&entry.key, &staged.path().join(name)))
                .map_err(|e| unavailable("fetching a checkpoint from the store", e))?;
        }
        let _ = std::fs::remove_dir_all(state);
        std::fs::rename(staged.keep(), state).map_err(|e| internal("restoring a checkpoint", e))?;
        return Ok(Some(step));
    }
    Ok(None)
}

/// Uploads `file` of the job's work to the store; a failure is logged: a worker that
/// takes the job over redoes that phase.
pub fn upload_work(store: &Store, job_id: &str, rt: &tokio::runtime::Handle, file: &Path) {
    let Some(name) = file.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    if let Err(e) = rt.block_on(store.upload_file(&work_key(job_id, name), file)) {
        tracing::warn!(job = %job_id, "uploading {name} to the store: {e}");
    }
}

/// Uploads the saved state `state` of `step` to the store: a copy taken (in `dir`) while
/// the trainer goes on (the state directory is replaced whole at each save; a copy whose
/// state file is not at `step` before and after is discarded), its state file last.
/// False when no whole copy went up.
pub fn upload_state(
    store: &Store,
    job_id: &str,
    rt: &tokio::runtime::Handle,
    dir: &Path,
    state: &Path,
    step: i64,
) -> bool {
    let copy = (|| -> std::io::Result<Option<tempfile::TempDir>> {
        if state_step(state) != Some(step) {
            return Ok(None);
        }
        let snap = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(dir)?;
        for entry in std::fs::read_dir(state)? {
            let entry = entry?;
            std::fs::copy(entry.path(), snap.path().join(entry.file_name()))?;
        }
        Ok(
            (state_step(state) == Some(step) && state_step(snap.path()) == Some(step))
                .then_some(snap),
        )
    })();
    let snap = match copy {
        Ok(Some(s)) => s,
        Ok(None) => {
            tracing::warn!(job = %job_id, step, "the saved state changed while it was copied: not uploaded");
            return false;
        }
        Err(e) => {
            tracing::warn!(job = %job_id, step, "copying the saved state: {e}");
            return false;
        }
    };
    let prefix = checkpoint_prefix(job_id, step);
    let uploaded = (|| -> Result<(), String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(snap.path())
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort_by_key(|p| p.file_name().is_some_and(|n| n == STATE_FILE));
        for f in files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            rt.block_on(store.upload_file(&format!("{prefix}/{name}"), &f))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })();
    match uploaded {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(job = %job_id, step, "uploading the saved state: {e}");
            false
        }
    }
}

/// Removes the stored states of `job_id` older than the `keep` newest steps of `steps`
/// (highest first).
pub async fn prune_states(
    store: &Store,
    job_id: &str,
    steps: &[i64],
    keep: usize,
) -> Result<(), StoreError> {
    for &step in steps.iter().skip(keep) {
        for entry in store.list(&checkpoint_prefix(job_id, step)).await? {
            store.delete(&entry.key).await?;
        }
    }
    Ok(())
}

/// Removes everything a job keeps in the object store.
pub async fn remove_stored(store: &Store, job_id: &str) -> Result<(), StoreError> {
    for entry in store.list(&format!("{JOBS_DIR}/{job_id}")).await? {
        store.delete(&entry.key).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(state: &Path, step: i64, bytes: &[u8]) {
        std::fs::create_dir_all(state).unwrap();
        std::fs::write(state.join("weights.safetensors"), bytes).unwrap();
        std::fs::write(state.join(STATE_FILE), format!(r#"{{"step": {step}}}"#)).unwrap();
    }

    #[test]
    fn saved_states_go_up_come_back_newest_first_and_are_pruned() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = rt.handle().clone();
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path().join("store").to_str().unwrap()).unwrap();
        let work = root.path().join("work");
        let state = work.join(".a.train-state");
        for name in [SCORES_FILE, EXPERTS_FILE] {
            std::fs::create_dir_all(&work).unwrap();
            std::fs::write(work.join(name), name).unwrap();
            upload_work(&store, "ftjob-1", &h, &work.join(name));
        }
        for step in [10, 20, 30] {
            save(&state, step, format!("w{step}").as_bytes());
            assert!(upload_state(&store, "ftjob-1", &h, &work, &state, step));
        }
        // A state not at the step asked for is not uploaded.
        assert!(!upload_state(&store, "ftjob-1", &h, &work, &state, 40));
        // Another worker's fresh directory gets the newest stored state of the recorded
        // steps (a step with no state stored is passed over).
        let fresh = root.path().join("fresh");
        std::fs::create_dir_all(&fresh).unwrap();
        let restored = fresh.join(".a.train-state");
        let got = restore(&store, "ftjob-1", &[50, 30, 20, 10], &fresh, &restored, &h).unwrap();
        assert_eq!(got, Some(30));
        assert_eq!(
            std::fs::read(restored.join("weights.safetensors")).unwrap(),
            b"w30"
        );
        assert_eq!(
            std::fs::read(fresh.join(SCORES_FILE)).unwrap(),
            SCORES_FILE.as_bytes()
        );
        // Pruned to the newest two; then all of the job's work goes.
        h.block_on(prune_states(&store, "ftjob-1", &[30, 20, 10], 2))
            .unwrap();
        let steps = |s: &Store| -> Vec<String> {
            let mut keys: Vec<String> = h
                .block_on(s.list(&format!("{JOBS_DIR}/ftjob-1/checkpoints")))
                .unwrap()
                .into_iter()
                .filter(|e| e.key.ends_with(STATE_FILE))
                .map(|e| e.key)
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(
            steps(&store),
            [
                format!("{JOBS_DIR}/ftjob-1/checkpoints/20/{STATE_FILE}"),
                format!("{JOBS_DIR}/ftjob-1/checkpoints/30/{STATE_FILE}")
            ]
        );
        h.block_on(remove_stored(&store, "ftjob-1")).unwrap();
        assert!(h
            .block_on(store.list(&format!("{JOBS_DIR}/ftjob-1")))
            .unwrap()
            .is_empty());
    }
}
