//! A run's results folder, owned by one value: its layout (`cells/<id>/`, `reference/`,
//! `tables/`, `figures/`, `report.md`), the record of which run owns it (`owner.json`), the locks
//! that keep its writers apart, and atomic writes (a file is written beside its place and renamed
//! into it; a cell is written into `cells/<id>.tmp-<host>-<pid>-<n>/` and renamed into place when
//! complete).
//!
//! Two ways to open one: [`ResultsDir::open`] for one process (the benchmark: a folder lock held
//! until dropped) and [`ResultsDir::open_shared`] for a grid, which many processes may run at
//! once on one machine or several sharing the folder (shards, Slurm array tasks): no folder
//! lock, a [`LeaseLock`] per cell (`cells/<id>.lock`) and per float reference instead, and a
//! finished cell is never replaced.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lock::{host_name, unique_suffix, Attempt, LeaseLock, Lock};

/// A results folder opened for writing.
#[derive(Debug)]
pub struct ResultsDir {
    root: PathBuf,
    /// Held by a folder opened with [`ResultsDir::open`].
    _lock: Option<Lock>,
}

/// Which run a results folder belongs to: the command and the run's name. Written on first use;
/// a run of another command or name is refused, so one experiment's results are never replaced
/// by another's. `config` and `config_sha256` say which config last wrote here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Owner {
    /// `experiments` (a grid) or `bench`.
    pub command: String,
    pub name: String,
    pub config: PathBuf,
    pub config_sha256: String,
}

impl Owner {
    /// The owner record of a run of `command` named `name` from the config file `config`, whose
    /// text was `text`.
    pub fn new(command: &str, name: &str, config: &Path, text: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Self {
            command: command.into(),
            name: name.into(),
            config: config.to_path_buf(),
            config_sha256: digest,
        }
    }

    fn describe(&self) -> String {
        format!("{} `{}` ({})", self.command, self.name, self.config.display())
    }
}

const OWNER_FILE: &str = "owner.json";

impl ResultsDir {
    /// Creates the folder if needed, takes its lock (held until dropped) and checks (or records)
    /// its owner; half-written cells of processes of this machine that no longer exist are
    /// removed.
    pub fn open(root: &Path, owner: &Owner) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let lock = Lock::acquire(&root.join(".lock"))?;
        let dir = Self { root: root.to_path_buf(), _lock: Some(lock) };
        dir.claim(owner)?;
        dir.remove_stale_temporaries()?;
        Ok(dir)
    }

    /// Like [`ResultsDir::open`] without the folder lock: for a grid that several processes
    /// write at once, each cell under its own lock ([`ResultsDir::try_lock_cell`]).
    pub fn open_shared(root: &Path, owner: &Owner) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let dir = Self { root: root.to_path_buf(), _lock: None };
        dir.claim(owner)?;
        dir.remove_stale_temporaries()?;
        Ok(dir)
    }

    /// Refuses a folder another run owns; records `owner` otherwise (a folder from before owner
    /// records is adopted). Safe without a lock: the first record is created exclusively (a
    /// hard link fails if the name exists), later ones only update the config it came from.
    fn claim(&self, owner: &Owner) -> Result<()> {
        let path = self.root.join(OWNER_FILE);
        let text = serde_json::to_string_pretty(owner)? + "\n";
        if !path.is_file() {
            let tmp = path.with_extension(format!("tmp-{}", unique_suffix()?));
            std::fs::write(&tmp, text.as_bytes())
                .with_context(|| format!("writing {}", tmp.display()))?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        let recorded_text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let recorded: Owner = serde_json::from_str(&recorded_text).with_context(|| {
            format!("{}: not an owner record (remove it to adopt the folder)", path.display())
        })?;
        if (recorded.command.as_str(), recorded.name.as_str())
            != (owner.command.as_str(), owner.name.as_str())
        {
            bail!(
                "{}: this folder holds the results of {}; this run is {} — give it its own folder (results_dir, or another name)",
                self.root.display(),
                recorded.describe(),
                owner.describe()
            );
        }
        if recorded != *owner {
            write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn cells(&self) -> PathBuf {
        self.root.join("cells")
    }

    /// A finished cell's folder.
    pub fn cell(&self, id: &str) -> PathBuf {
        self.cells().join(id)
    }

    /// A cell is finished once its `metrics.csv` is in place (written last).
    pub fn is_done(&self, id: &str) -> bool {
        self.cell(id).join("metrics.csv").is_file()
    }

    /// A cached float reference (`reference/<key>.safetensors`).
    pub fn reference(&self, key: &str) -> PathBuf {
        self.root.join("reference").join(format!("{key}.safetensors"))
    }

    /// `tables/`, created.
    pub fn tables(&self) -> Result<PathBuf> {
        self.subfolder("tables")
    }

    /// `figures/`, created.
    pub fn figures(&self) -> Result<PathBuf> {
        self.subfolder("figures")
    }

    pub fn report(&self) -> PathBuf {
        self.root.join("report.md")
    }

    fn subfolder(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Takes cell `id`'s lock (`cells/<id>.lock`), unless a live process holds it. Once held,
    /// the half-written folders other processes left for this cell are removed.
    pub fn try_lock_cell(&self, id: &str, lease: Duration) -> Result<Option<CellLock>> {
        let cells = self.cells();
        std::fs::create_dir_all(&cells).with_context(|| format!("creating {}", cells.display()))?;
        let lock = match LeaseLock::try_acquire(&cells.join(format!("{id}.lock")), lease)? {
            Attempt::Acquired(lock) => lock,
            Attempt::Busy(_) => return Ok(None),
        };
        let prefix = format!("{id}.tmp-");
        for entry in std::fs::read_dir(&cells)
            .with_context(|| format!("reading {}", cells.display()))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                remove_unfinished(&entry.path())?;
            }
        }
        Ok(Some(CellLock { id: id.to_string(), lock }))
    }

    /// Who holds cell `id`'s lock now, for messages (`None` when nobody does).
    pub fn cell_holder(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(self.cells().join(format!("{id}.lock"))).ok().map(|t| {
            serde_json::from_str::<crate::lock::Holder>(t.trim())
                .map_or_else(|_| "a process".into(), |h| format!("host {} pid {}", h.host, h.pid))
        })
    }

    /// Takes the lock of the float reference `key`, unless a live process holds it.
    pub fn try_lock_reference(&self, key: &str, lease: Duration) -> Result<Option<LeaseLock>> {
        let dir = self.subfolder("reference")?;
        match LeaseLock::try_acquire(&dir.join(format!("{key}.lock")), lease)? {
            Attempt::Acquired(lock) => Ok(Some(lock)),
            Attempt::Busy(_) => Ok(None),
        }
    }

    /// Takes the lock of the tables, figures and report, unless a live process holds it.
    pub fn try_lock_outputs(&self, lease: Duration) -> Result<Option<LeaseLock>> {
        match LeaseLock::try_acquire(&self.root.join("outputs.lock"), lease)? {
            Attempt::Acquired(lock) => Ok(Some(lock)),
            Attempt::Busy(_) => Ok(None),
        }
    }

    /// Starts writing the locked cell into a temporary folder; [`CellWriter::finish`] puts it in
    /// place.
    pub fn begin_cell<'a>(&self, cell: &'a CellLock) -> Result<CellWriter<'a>> {
        let done = self.cell(&cell.id);
        let tmp = done.with_extension(format!("tmp-{}", unique_suffix()?));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(CellWriter { tmp, done, lock: cell, finished: false })
    }

    /// Removes half-written cell folders (`<id>.tmp-<host>-<pid>-<n>`, or `<id>.tmp-<pid>` from
    /// before hosts were recorded) of processes of this machine that no longer exist. Those of
    /// other machines are removed by whoever takes their cell's lock.
    fn remove_stale_temporaries(&self) -> Result<()> {
        let cells = self.cells();
        if !cells.is_dir() {
            return Ok(());
        }
        let host = host_name()?;
        for entry in std::fs::read_dir(&cells)
            .with_context(|| format!("reading {}", cells.display()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some((_, writer)) = name.rsplit_once(".tmp-") else { continue };
            let pid = match writer.rsplitn(3, '-').collect::<Vec<_>>()[..] {
                [_, pid, h] if h == host => pid,
                [pid] => pid,
                _ => continue,
            };
            if pid.parse::<u32>().is_ok_and(|p| p != std::process::id())
                && !Path::new("/proc").join(pid).exists()
            {
                remove_unfinished(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn remove_unfinished(path: &Path) -> Result<()> {
    tracing::info!("removing the unfinished cell folder {}", path.display());
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// A cell this process holds the lock of (released on drop).
#[derive(Debug)]
pub struct CellLock {
    id: String,
    lock: LeaseLock,
}

/// How [`CellWriter::finish`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    Written,
    /// Another process finished the cell first (it stalled this one past its lease and took the
    /// lock over); that result is kept and this one dropped.
    KeptTheOther,
}

/// A cell being written: files go into its temporary folder, which is removed again unless the
/// cell is finished (a failed cell leaves nothing behind).
#[derive(Debug)]
pub struct CellWriter<'a> {
    tmp: PathBuf,
    done: PathBuf,
    lock: &'a CellLock,
    finished: bool,
}

impl CellWriter<'_> {
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.tmp.join(name), bytes)
    }

    /// Writes `metrics.csv` (last: its presence marks the cell complete inside the folder too)
    /// and renames the folder into place. A finished cell is never replaced: renaming a folder
    /// onto a folder that has files fails.
    pub fn finish(mut self, metrics_csv: &[u8]) -> Result<Finished> {
        self.write("metrics.csv", metrics_csv)?;
        if self.done.join("metrics.csv").is_file() {
            return Ok(Finished::KeptTheOther);
        }
        if !self.lock.lock.holds() {
            bail!(
                "the lock of cell {} was taken over by another process while this one ran (it stalled past its lease); this result is not written",
                self.lock.id
            );
        }
        if self.done.exists() {
            std::fs::remove_dir_all(&self.done)
                .with_context(|| format!("removing incomplete {}", self.done.display()))?;
        }
        match std::fs::rename(&self.tmp, &self.done) {
            Ok(()) => {}
            Err(_) if self.done.join("metrics.csv").is_file() => return Ok(Finished::KeptTheOther),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("renaming {} into place", self.tmp.display()))
            }
        }
        self.finished = true;
        Ok(Finished::Written)
    }
}

impl Drop for CellWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` beside `path` and renames them into place, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", unique_suffix()?));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(command: &str, name: &str) -> Owner {
        Owner {
            command: command.into(),
            name: name.into(),
            config: PathBuf::from(format!("configs/{name}.toml")),
            config_sha256: "0".repeat(64),
        }
    }

    #[test]
    fn a_folder_belongs_to_one_run() {
        let root = std::env::temp_dir().join(format!("qvlm-results-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let first = ResultsDir::open(&root, &owner("experiments", "ablation")).expect("open");
        // Locked while open.
        let err = ResultsDir::open(&root, &owner("experiments", "ablation")).expect_err("locked");
        assert!(format!("{err:#}").contains("another run"), "{err:#}");
        drop(first);
        // The same run again (its config may have changed): fine.
        let mut again = owner("experiments", "ablation");
        again.config_sha256 = "1".repeat(64);
        drop(ResultsDir::open(&root, &again).expect("same run"));
        // Another experiment or command: refused, naming both.
        for other in [owner("experiments", "table2"), owner("bench", "ablation")] {
            let err = ResultsDir::open(&root, &other).expect_err("other run");
            let msg = format!("{err:#}");
            assert!(
                msg.contains("experiments `ablation`") && msg.contains(&other.describe()),
                "{msg}"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
