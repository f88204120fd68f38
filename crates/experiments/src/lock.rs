//! Locks on files, and who this process is.
//!
//! - [`Lock`]: one process on one machine uses what a lock file guards (the benchmark's results
//!   folder, a model folder being written). The file holds the pid; a lock of a pid that no
//!   longer exists is taken over.
//! - [`LeaseLock`]: one process among many, on one machine or several sharing a folder (a cell of
//!   a grid run by Slurm array tasks on a shared filesystem). A pid means nothing on another
//!   host, so the file records host, pid and a token, and a heartbeat thread keeps its
//!   modification time fresh. A lock is stale when its process is known to have ended (same
//!   host, pid gone) or its heartbeat is older than its lease. A stale lock is removed only by
//!   the holder of a second lock file, `<lock>.takeover` (created exclusively, held for
//!   milliseconds), after it looked again and found the very file it judged (same inode and
//!   text) still stale; then every contender tries to create the lock afresh and one succeeds.
//!
//! Hosts' clocks are compared through the heartbeat times (set from the writer's clock), so a
//! lease must be much longer than the clock skew between hosts (NTP keeps it under a second;
//! the default lease is two minutes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// This machine's host name (`/proc/sys/kernel/hostname`), read once.
pub fn host_name() -> Result<&'static str> {
    static HOST: OnceLock<String> = OnceLock::new();
    if let Some(h) = HOST.get() {
        return Ok(h);
    }
    let path = "/proc/sys/kernel/hostname";
    let name = std::fs::read_to_string(path)
        .with_context(|| format!("reading {path} (the host name locks record)"))?
        .trim()
        .to_string();
    if name.is_empty() {
        bail!("{path} is empty: locks need a host name");
    }
    Ok(HOST.get_or_init(|| name))
}

/// A name part no other process writing the same folder uses: host, pid and a counter.
pub fn unique_suffix() -> Result<String> {
    static N: AtomicU64 = AtomicU64::new(0);
    Ok(format!("{}-{}-{}", host_name()?, std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// Whether a process of this machine exists.
fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Exclusive use of what a lock file guards for one process of one machine; the file holds its
/// pid and is removed on drop. A lock left by a process that no longer exists is taken over.
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
                    let alive = pid.parse::<u32>().is_ok_and(pid_alive);
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

/// What a [`LeaseLock`] file records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Unique per acquisition: tells this holder's file from a later one at the same path.
    pub token: String,
    /// `SLURM_JOB_ID` (with `_<SLURM_ARRAY_TASK_ID>` for an array task) when run by Slurm.
    pub job: Option<String>,
    /// The holder's heartbeat is at least this fresh while it lives.
    pub lease_seconds: f64,
}

impl Holder {
    /// `host vm pid 123 (Slurm job 7_2), heartbeat 3 s ago`.
    fn describe(&self, age: Duration) -> String {
        let job = self.job.as_ref().map(|j| format!(" (Slurm job {j})")).unwrap_or_default();
        format!(
            "host {} pid {}{job}, heartbeat {:.0} s ago",
            self.host,
            self.pid,
            age.as_secs_f64()
        )
    }
}

/// The Slurm job this process runs in, if any: `JOBID` or `ARRAYJOBID_TASKID`.
pub fn slurm_job() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID"), var("SLURM_JOB_ID")) {
        (Some(array), Some(task), _) => Some(format!("{array}_{task}")),
        (_, _, job) => job,
    }
}

/// The outcome of [`LeaseLock::try_acquire`].
#[derive(Debug)]
pub enum Attempt {
    Acquired(LeaseLock),
    /// Another live process holds it (described for messages).
    Busy(String),
}

/// A lock file that many processes on many hosts may contend for; see the module docs. Released
/// (the file removed, if it is still this holder's) on drop.
#[derive(Debug)]
pub struct LeaseLock {
    path: PathBuf,
    token: String,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

/// A lock file as seen at one moment.
struct Observed {
    inode: u64,
    modified: SystemTime,
    text: String,
}

fn observe(path: &Path) -> Result<Option<Observed>> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let modified = meta.modified().with_context(|| format!("mtime of {}", path.display()))?;
    Ok(Some(Observed { inode: meta.ino(), modified, text }))
}

fn age_of(seen: &Observed) -> Duration {
    SystemTime::now().duration_since(seen.modified).unwrap_or_default()
}

enum Judgement {
    Live(String),
    Stale(String),
}

/// Whether the lock `seen` is live, judged from `host` (this machine) with `lease` as the lease
/// of a file that does not say its own.
fn judge(seen: &Observed, host: &str, lease: Duration) -> Judgement {
    let age = age_of(seen);
    match serde_json::from_str::<Holder>(seen.text.trim()) {
        Ok(h) if h.host == host && !pid_alive(h.pid) => {
            Judgement::Stale(format!("its process (pid {}) has ended", h.pid))
        }
        Ok(h) if age.as_secs_f64() > h.lease_seconds => Judgement::Stale(format!(
            "no heartbeat for {:.0} s (lease {:.0} s)",
            age.as_secs_f64(),
            h.lease_seconds
        )),
        Ok(h) => Judgement::Live(h.describe(age)),
        // Being written right now (created, not yet filled), or not a lock of ours.
        Err(_) if age > lease => {
            Judgement::Stale(format!("unreadable and untouched for {:.0} s", age.as_secs_f64()))
        }
        Err(_) => Judgement::Live(format!("being taken ({:?})", seen.text)),
    }
}

impl LeaseLock {
    /// Takes the lock at `path` (its folder must exist) unless a live process holds it; a stale
    /// lock is taken over. `lease` is how long this holder may go without a heartbeat (one is
    /// written every quarter lease) before others may take the lock.
    pub fn try_acquire(path: &Path, lease: Duration) -> Result<Attempt> {
        if lease.is_zero() {
            bail!("a lock lease must be longer than zero");
        }
        let holder = Holder {
            host: host_name()?.to_string(),
            pid: std::process::id(),
            token: unique_suffix()?,
            job: slurm_job(),
            lease_seconds: lease.as_secs_f64(),
        };
        for _ in 0..8 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    let text = serde_json::to_string(&holder)? + "\n";
                    file.write_all(text.as_bytes())
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(Attempt::Acquired(Self::start(path, holder.token, file, lease)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating {} (is the folder writable?)", path.display())
                    })
                }
            }
            let Some(seen) = observe(path)? else { continue };
            let reason = match judge(&seen, &holder.host, lease) {
                Judgement::Live(who) => return Ok(Attempt::Busy(who)),
                Judgement::Stale(reason) => reason,
            };
            // Only the holder of `<lock>.takeover` may remove a stale lock, after looking again:
            // a live lock is never removed, not even for a moment.
            let guard = PathBuf::from(format!("{}.takeover", path.display()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&guard) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A takeover takes milliseconds; a guard older than a lease is of a process
                    // that died taking over.
                    let g = observe(&guard)?;
                    if g.is_some_and(|g| age_of(&g) > lease) {
                        let _ = std::fs::remove_file(&guard);
                        continue;
                    }
                    return Ok(Attempt::Busy("being taken over by another process".into()));
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", guard.display())),
            }
            let removed = (|| -> Result<bool> {
                let Some(again) = observe(path)? else { return Ok(false) };
                let same = again.inode == seen.inode && again.text == seen.text;
                if !same || matches!(judge(&again, &holder.host, lease), Judgement::Live(_)) {
                    return Ok(false);
                }
                match std::fs::remove_file(path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e).with_context(|| format!("removing stale {}", path.display())),
                }
            })();
            let _ = std::fs::remove_file(&guard);
            if removed? {
                tracing::warn!("took over {} ({reason})", path.display());
            }
        }
        Ok(Attempt::Busy("contended by several processes".into()))
    }

    fn start(path: &Path, token: String, file: std::fs::File, lease: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let beat = lease / 4;
        let heartbeat = {
            let stop = Arc::clone(&stop);
            let path = path.to_path_buf();
            std::thread::spawn(move || {
                let tick = beat.min(Duration::from_millis(200));
                let mut since = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    since += tick;
                    if since >= beat {
                        since = Duration::ZERO;
                        // The open file, not the path: a lock taken over is not kept alive.
                        if let Err(e) = file.set_modified(SystemTime::now()) {
                            tracing::warn!("heartbeat of {}: {e}", path.display());
                        }
                    }
                }
            })
        };
        Self { path: path.to_path_buf(), token, stop, heartbeat: Some(heartbeat) }
    }

    /// Whether the lock file at its path is still this holder's (it is not when this process
    /// stalled past its lease and another took the lock over).
    pub fn holds(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<Holder>(t.trim()).ok())
            .is_some_and(|h| h.token == self.token)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LeaseLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        if self.holds() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qvlm-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    fn acquired(a: Attempt) -> LeaseLock {
        match a {
            Attempt::Acquired(l) => l,
            Attempt::Busy(who) => panic!("busy: {who}"),
        }
    }

    fn busy(a: Attempt) -> String {
        match a {
            Attempt::Acquired(l) => panic!("acquired {}", l.path().display()),
            Attempt::Busy(who) => who,
        }
    }

    fn write_holder(path: &Path, host: &str, pid: u32, lease: f64) {
        let h =
            Holder { host: host.into(), pid, token: "t".into(), job: None, lease_seconds: lease };
        std::fs::write(path, serde_json::to_string(&h).expect("json")).expect("write");
    }

    #[test]
    fn a_live_lease_lock_is_busy_and_released_on_drop() {
        let dir = scratch("live");
        let path = dir.join("cell.lock");
        let lease = Duration::from_secs(60);
        let first = acquired(LeaseLock::try_acquire(&path, lease).expect("try"));
        assert!(first.holds());
        let who = busy(LeaseLock::try_acquire(&path, lease).expect("try"));
        assert!(who.contains(&format!("pid {}", std::process::id())), "{who}");
        drop(first);
        assert!(!path.exists(), "released");
        drop(acquired(LeaseLock::try_acquire(&path, lease).expect("again")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_lease_locks_are_taken_over_and_live_ones_of_other_hosts_are_not() {
        let dir = scratch("stale");
        let path = dir.join("cell.lock");
        let lease = Duration::from_secs(60);
        // This host, a pid that has ended: taken over at once.
        write_holder(&path, host_name().expect("host"), 999_999_999, 3600.0);
        drop(acquired(LeaseLock::try_acquire(&path, lease).expect("dead pid")));
        // Another host with a fresh heartbeat: its pid cannot be checked here, so it is live.
        write_holder(&path, "elsewhere", 1, 3600.0);
        let who = busy(LeaseLock::try_acquire(&path, lease).expect("other host"));
        assert!(who.contains("host elsewhere pid 1"), "{who}");
        // The same lock once its heartbeat is older than its lease: taken over.
        let old = SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open")
            .set_modified(old)
            .expect("mtime");
        let lock = acquired(LeaseLock::try_acquire(&path, lease).expect("expired"));
        assert!(lock.holds());
        drop(lock);
        // Nothing left aside.
        let left: Vec<_> =
            std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_heartbeat_keeps_a_short_lease_alive() {
        let dir = scratch("beat");
        let path = dir.join("cell.lock");
        let lease = Duration::from_millis(800);
        let lock = acquired(LeaseLock::try_acquire(&path, lease).expect("try"));
        // Pretend to be another host looking at it: rewrite the host without touching the inode.
        let text = std::fs::read_to_string(&path).expect("read");
        let mut h: Holder = serde_json::from_str(text.trim()).expect("holder");
        h.host = "elsewhere".into();
        std::fs::write(&path, serde_json::to_string(&h).expect("json")).expect("write");
        std::thread::sleep(Duration::from_millis(2000));
        busy(LeaseLock::try_acquire(&path, lease).expect("still beating"));
        drop(lock);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn of_many_contenders_for_a_stale_lock_exactly_one_wins() {
        let dir = scratch("race");
        let path = dir.join("cell.lock");
        for round in 0..20 {
            write_holder(&path, host_name().expect("host"), 999_999_999, 3600.0);
            let winners: Vec<LeaseLock> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| LeaseLock::try_acquire(&path, Duration::from_secs(60))))
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| match h.join().expect("thread").expect("try") {
                        Attempt::Acquired(l) => Some(l),
                        Attempt::Busy(_) => None,
                    })
                    .collect()
            });
            assert_eq!(winners.len(), 1, "round {round}");
            assert!(winners[0].holds());
            drop(winners);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
