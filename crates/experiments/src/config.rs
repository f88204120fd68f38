//! The experiment config (TOML, `deny_unknown_fields` everywhere) and the runner.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use qvlm_core::device::DeviceSpec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub experiment: Experiment,
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub device: DeviceSpec,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[serde(default)]
    pub threads: i32,
    #[serde(default)]
    pub seed: i64,
    /// Results folder (default `results/<name>` next to the config's `configs/` folder).
    #[serde(default)]
    pub results_dir: Option<PathBuf>,
}

pub fn load(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: Config =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if cfg.experiment.name.trim().is_empty() {
        anyhow::bail!("{}: key `experiment.name`: must not be empty", path.display());
    }
    if cfg.experiment.threads < 0 {
        anyhow::bail!("{}: key `experiment.threads`: must be ≥ 0", path.display());
    }
    cfg.file = path.to_path_buf();
    Ok(cfg)
}

pub fn print_plan(cfg: &Config) {
    println!("experiment `{}` from {}", cfg.experiment.name, cfg.file.display());
    println!(
        "  device {:?}, threads {}, seed {}",
        cfg.experiment.device, cfg.experiment.threads, cfg.experiment.seed
    );
}

pub fn results_dir(cfg: &Config) -> PathBuf {
    cfg.experiment
        .results_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("results").join(&cfg.experiment.name))
}

/// Environment of a run, recorded next to its results.
#[derive(Debug, Serialize)]
pub struct Manifest {
    pub experiment: String,
    pub git_revision: String,
    pub libtorch: String,
    pub device: String,
    pub threads: i32,
    pub seed: i64,
}

pub fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub fn run(cfg: &Config) -> Result<()> {
    let device = cfg.experiment.device.resolve()?;
    if cfg.experiment.threads > 0 {
        tch::set_num_threads(cfg.experiment.threads);
    }
    tch::manual_seed(cfg.experiment.seed);
    let manifest = Manifest {
        experiment: cfg.experiment.name.clone(),
        git_revision: git_revision(),
        libtorch: qvlm_core::device::libtorch_version(),
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
        seed: cfg.experiment.seed,
    };
    let dir = results_dir(cfg);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
