//! A run's results folder, owned by one value: its layout (`cells/<id>/`, `reference/`,
//! `tables/`, `figures/`, `report.md`), the lock that makes one process its only writer, the
//! record of which run owns it (`owner.json`), and atomic writes (a file is written beside its
//! place and renamed into it; a cell is written into `cells/<id>.tmp-<pid>/` and renamed into
//! place when complete).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// A results folder opened for writing (locked until dropped).
#[derive(Debug)]
pub struct ResultsDir {
    root: PathBuf,
    _lock: Lock,
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
    /// Creates the folder if needed, takes its lock and checks (or records) its owner;
    /// half-written cells of processes that no longer exist are removed.
    pub fn open(root: &Path, owner: &Owner) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let lock = Lock::acquire(&root.join(".lock"))?;
        let dir = Self { root: root.to_path_buf(), _lock: lock };
        dir.claim(owner)?;
        dir.remove_stale_temporaries()?;
        Ok(dir)
    }

    /// Refuses a folder another run owns; records `owner` otherwise (a folder from before owner
    /// records is adopted).
    fn claim(&self, owner: &Owner) -> Result<()> {
        let path = self.root.join(OWNER_FILE);
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let recorded: Owner = serde_json::from_str(&text).with_context(|| {
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
        }
        write_atomic(&path, (serde_json::to_string_pretty(owner)? + "\n").as_bytes())
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

    /// Starts writing cell `id` into a temporary folder; [`CellWriter::finish`] puts it in place.
    pub fn begin_cell(&self, id: &str) -> Result<CellWriter> {
        let cells = self.cells();
        std::fs::create_dir_all(&cells).with_context(|| format!("creating {}", cells.display()))?;
        let done = self.cell(id);
        let tmp = done.with_extension(format!("tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(CellWriter { tmp, done, finished: false })
    }

    /// Removes half-written cell folders (`<id>.tmp-<pid>`) of runs that no longer exist.
    fn remove_stale_temporaries(&self) -> Result<()> {
        let cells = self.cells();
        if !cells.is_dir() {
            return Ok(());
        }
        for entry in std::fs::read_dir(&cells)
            .with_context(|| format!("reading {}", cells.display()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some((_, pid)) = name.rsplit_once(".tmp-") else { continue };
            if pid == std::process::id().to_string() || !Path::new("/proc").join(pid).exists() {
                let path = entry.path();
                tracing::info!("removing the unfinished cell folder {}", path.display());
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// A cell being written: files go into its temporary folder, which is removed again unless the
/// cell is finished (a failed cell leaves nothing behind).
#[derive(Debug)]
pub struct CellWriter {
    tmp: PathBuf,
    done: PathBuf,
    finished: bool,
}

impl CellWriter {
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.tmp.join(name), bytes)
    }

    /// Writes `metrics.csv` (last: its presence marks the cell complete inside the folder too)
    /// and renames the folder into place.
    pub fn finish(mut self, metrics_csv: &[u8]) -> Result<()> {
        self.write("metrics.csv", metrics_csv)?;
        if self.done.exists() {
            std::fs::remove_dir_all(&self.done)
                .with_context(|| format!("removing incomplete {}", self.done.display()))?;
        }
        std::fs::rename(&self.tmp, &self.done)
            .with_context(|| format!("renaming {} into place", self.tmp.display()))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for CellWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` beside `path` and renames them into place, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// Exclusive use of what a lock file guards (a results folder, a model folder being written) for
/// one process; the file holds its pid and is removed on drop. A lock left by a process that no
/// longer exists is taken over.
#[derive(Debug)]
pub struct Lock(PathBuf);

impl Lock {
    /// Creates the lock file `path` (its folder must exist), or fails naming the live holder.
    pub fn acquire(path: &Path) -> Result<Lock> {
        let path = path.to_path_buf();
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(Lock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
                    let alive = !pid.is_empty() && Path::new("/proc").join(&pid).exists();
                    if alive {
                        bail!(
                            "{}: another run (pid {pid}) holds this lock; wait for it or remove the lock if that process is gone",
                            path.display()
                        );
                    }
                    tracing::warn!(pid, "taking over a stale lock at {}", path.display());
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing stale {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating {} (is the folder writable?)", path.display())
                    })
                }
            }
        }
        bail!("{}: could not take the lock", path.display())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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
