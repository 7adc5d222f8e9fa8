//! The disk tier: the adapters directory. One subdirectory per adapter, named as the adapter;
//! the listing is rescanned on demand (an unknown name triggers a rescan).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::format::{validate_name, AdapterError, MANIFEST_FILE, REFERENCE_CONFIG_FILE};

pub struct AdapterStore {
    root: PathBuf,
    index: RwLock<BTreeMap<String, PathBuf>>,
}

impl AdapterStore {
    /// Opens (and creates if missing) the adapters directory.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let store = Self {
            root: root.to_path_buf(),
            index: RwLock::new(BTreeMap::new()),
        };
        store.rescan();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Re-reads the directory listing. Entries that are not adapter directories, or whose
    /// names are not valid adapter names (e.g. in-progress `.adapter-*` writes), are skipped.
    pub fn rescan(&self) -> Vec<String> {
        let mut found = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let path = e.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                let is_adapter = path.join(MANIFEST_FILE).is_file()
                    || path.join(REFERENCE_CONFIG_FILE).is_file();
                if is_adapter && validate_name(&name).is_ok() {
                    found.insert(name, path);
                }
            }
        }
        let names = found.keys().cloned().collect();
        if let Ok(mut idx) = self.index.write() {
            *idx = found;
        }
        names
    }

    pub fn names(&self) -> Vec<String> {
        self.index
            .read()
            .map(|i| i.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The directory of `name`, rescanning once if it is not known yet.
    pub fn path(&self, name: &str) -> Result<PathBuf, AdapterError> {
        validate_name(name)?;
        let known = |s: &Self| s.index.read().ok().and_then(|i| i.get(name).cloned());
        if let Some(p) = known(self) {
            if p.exists() {
                return Ok(p);
            }
        }
        self.rescan();
        known(self).ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Moves a complete, already validated adapter directory into the store as `name`.
    pub fn install_dir(&self, staged: PathBuf, name: &str) -> Result<PathBuf, AdapterError> {
        validate_name(name)?;
        let dest = self.root.join(name);
        crate::util::replace_dir(staged, &dest).map_err(|e| AdapterError::Io(name.into(), e))?;
        self.rescan();
        Ok(dest)
    }

    /// Deletes an adapter directory (renamed aside first, so readers never see half of it).
    pub fn delete(&self, name: &str) -> Result<(), AdapterError> {
        let path = self.path(name)?;
        let trash = tempfile::Builder::new()
            .prefix(".deleted-")
            .tempdir_in(&self.root)
            .map_err(|e| AdapterError::Io(name.into(), e))?;
        std::fs::rename(&path, trash.path().join("dir"))
            .map_err(|e| AdapterError::Io(name.into(), e))?;
        drop(trash);
        self.rescan();
        Ok(())
    }

    /// Creates a staging directory inside the store (same filesystem: rename is atomic).
    pub fn staging_dir(&self) -> std::io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(".adapter-")
            .tempdir_in(&self.root)
    }
}
