//! Small filesystem helpers shared by everything that writes adapters, checkpoints and jobs.

use std::path::{Path, PathBuf};

/// Moves the complete directory `staged` to `dest`. If `dest` exists it is first renamed
/// aside and removed after the swap, so readers see either the old or the new directory.
pub fn replace_dir(staged: PathBuf, dest: &Path) -> std::io::Result<()> {
    if dest.exists() {
        let parent = dest.parent().unwrap_or(Path::new("."));
        let trash = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(parent)?
            .keep();
        let aside = trash.join("dir");
        std::fs::rename(dest, &aside)?;
        if let Err(e) = std::fs::rename(&staged, dest) {
            // Put the old one back; the staged copy is left for inspection.
            let _ = std::fs::rename(&aside, dest);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&trash);
        Ok(())
    } else {
        std::fs::rename(&staged, dest)
    }
}

/// Writes a file atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Pins the compute thread count (`RAYON_NUM_THREADS`) to the available cores unless the
/// user set it. candle looks the count up on every matmul and, when the variable is unset,
/// re-reads `/proc/cpuinfo` each time, which costs more than a decode-sized matmul. Call at
/// the start of `main`, before any other thread exists.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
