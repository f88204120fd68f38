//! The grid runner: every cell of a config, each written to `results/<experiment>/cells/<id>/`
//! atomically (a temporary folder renamed into place), finished cells skipped on a re-run, a lock
//! so that two runs never share a results folder, and the tables/figures/report at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qvlm_core::hook::NoHook;
use qvlm_core::model::llava::{LlavaBundle, LoadOptions};
use qvlm_core::model::outliers::plant_outliers;
use qvlm_search::engine::WeightMethod;
use qvlm_search::plan::{apply, QuantPlan};
use qvlm_search::strategy;
use serde::Serialize;
use tch::Tensor;

use crate::config::{results_dir, Cell, Config};
use crate::eval::dataset::EvalData;
use crate::memory::model_bytes;
use crate::methods::WeightFormat;

/// Environment of a run, recorded with each cell.
#[derive(Debug, Serialize, Clone)]
pub struct Manifest {
    pub experiment: String,
    pub cell: String,
    pub git_revision: String,
    pub tch: String,
    pub libtorch: String,
    pub device: String,
    pub threads: i32,
    pub seed: u64,
    pub nonfinite_calibration_values: u64,
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

/// Exclusive use of a results folder for one run; removed on drop. A lock left by a process
/// that no longer exists is taken over.
pub struct Lock(PathBuf);

impl Lock {
    pub fn acquire(dir: &Path) -> Result<Lock> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(".lock");
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
                            "{}: another run (pid {pid}) is using this results folder; wait for it or remove the lock if that process is gone",
                            path.display()
                        );
                    }
                    tracing::warn!(pid, "taking over a stale lock at {}", path.display());
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing stale {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating {} (is the results folder writable?)", path.display())
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

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// One metric row of a cell (tidy: one value per row).
#[derive(Debug, Clone, Serialize)]
pub struct MetricRow {
    pub cell: String,
    pub model: String,
    pub bits: String,
    pub method: String,
    pub metric: String,
    pub value: f64,
}

fn metric_csv(rows: &[MetricRow]) -> String {
    let mut s = String::from("cell,model,bits,method,metric,value\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.cell,
            r.model,
            r.bits,
            r.method,
            r.metric,
            format_value(r.value)
        ));
    }
    s
}

/// Values printed with a fixed precision so identical runs give byte-identical files.
pub fn format_value(v: f64) -> String {
    if v.is_finite() && v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.6}")
    }
}

/// Everything loaded once per run.
struct Shared {
    data: EvalData,
    /// Float answer distributions per model name (the reference for KL / agreement).
    reference: BTreeMap<String, Tensor>,
}

pub fn cell_dir(cfg: &Config, id: &str) -> PathBuf {
    results_dir(cfg).join("cells").join(id)
}

/// Runs every unfinished cell, then writes tables, figures and the report.
pub fn run(cfg: &Config, cells: &[Cell]) -> Result<()> {
    let device = cfg.experiment.device.resolve()?;
    if cfg.experiment.threads > 0 {
        tch::set_num_threads(cfg.experiment.threads);
    }
    let dir = results_dir(cfg);
    let _lock = Lock::acquire(&dir)?;
    std::fs::create_dir_all(dir.join("cells"))
        .with_context(|| format!("creating {}", dir.join("cells").display()))?;
    let mut shared = Shared { data: EvalData::load(&cfg.dataset)?, reference: BTreeMap::new() };
    if shared.data.is_empty() {
        bail!("{}: the dataset has no questions to evaluate", cfg.file.display());
    }
    remove_stale_temporaries(&dir.join("cells"))?;
    for cell in cells {
        check_widths(cell)?;
    }
    let total = cells.len();
    for (i, cell) in cells.iter().enumerate() {
        let out = cell_dir(cfg, &cell.id);
        if out.join("metrics.csv").is_file() {
            tracing::info!(
                "[{}/{total}] {} {} {}: done already, skipped",
                i + 1,
                cell.model.name,
                bits_label(cell),
                cell.method
            );
            continue;
        }
        tracing::info!(
            "[{}/{total}] {} {} {}: running",
            i + 1,
            cell.model.name,
            bits_label(cell),
            cell.method
        );
        run_cell(cfg, cell, device, &mut shared).with_context(|| {
            format!("cell {} ({} {} {})", cell.id, cell.model.name, bits_label(cell), cell.method)
        })?;
    }
    crate::report::write_all(cfg, cells)?;
    Ok(())
}

/// Removes half-written cell folders (`<id>.tmp-<pid>`) of runs that no longer exist.
fn remove_stale_temporaries(cells: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(cells).with_context(|| format!("reading {}", cells.display()))?.flatten()
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

/// Refuses, before any cell runs, a weight group size that does not divide a quantized layer's
/// input width (read from the model's config.json).
fn check_widths(cell: &Cell) -> Result<()> {
    let Some(spec) = &cell.spec else { return Ok(()) };
    let group = cell.quant.weight_group;
    if group == 0 || cell.bits.is_some_and(|b| b.w == 16) {
        return Ok(());
    }
    if spec.weights == WeightFormat::Nf4 && cell.bits.is_some_and(|b| b.w == 4) {
        return Ok(());
    }
    let config = cell.model.path.join("config.json");
    let cfg = match qvlm_core::io::config::detect_format(&config)? {
        qvlm_core::io::config::CheckpointFormat::LlavaHf => {
            qvlm_core::io::config::LlavaConfig::from_hf_json(&config)?
        }
        // Original LLaVA needs its CLIP directory for the vision widths; checked when quantizing.
        qvlm_core::io::config::CheckpointFormat::Original => return Ok(()),
    };
    let (v, t) = (&cfg.vision, &cfg.text);
    let mut widths = vec![
        ("language hidden_size", t.hidden_size),
        ("language intermediate_size", t.intermediate_size),
    ];
    if cell.quant.quantize_vision {
        widths.push(("vision hidden_size", v.hidden_size));
        widths.push(("vision intermediate_size", v.intermediate_size));
    }
    for (name, w) in widths {
        if w % group != 0 {
            bail!(
                "key `quant.weight_group`: {group} does not divide the {name} {w} of model `{}` ({})",
                cell.model.name,
                config.display()
            );
        }
    }
    Ok(())
}

pub fn bits_label(cell: &Cell) -> String {
    cell.bits.map(|b| b.label()).unwrap_or_else(|| "FP".into())
}

fn load_model(cell: &Cell, device: tch::Device) -> Result<LlavaBundle> {
    let opts = LoadOptions { device, dtype: cell.model.dtype, clip_dir: cell.model.clip.clone() };
    let mut bundle = LlavaBundle::load(&cell.model.path, &opts).with_context(|| {
        format!("loading model `{}` from {}", cell.model.name, cell.model.path.display())
    })?;
    if let Some(spec) = &cell.model.outliers {
        plant_outliers(&mut bundle.model, spec);
    }
    Ok(bundle)
}

/// Float answer distributions of a model, from its float cell when the run has one.
fn reference(
    cfg: &Config,
    cell: &Cell,
    device: tch::Device,
    shared: &mut Shared,
) -> Result<Tensor> {
    if let Some(t) = shared.reference.get(&cell.model.name) {
        return Ok(t.shallow_clone());
    }
    let path =
        results_dir(cfg).join("reference").join(format!("{}.safetensors", reference_key(cell)?));
    if path.is_file() {
        let t = qvlm_core::io::safetensors::SafetensorsFile::open(&path)?.read("log_probs")?;
        shared.reference.insert(cell.model.name.clone(), t.shallow_clone());
        return Ok(t);
    }
    let bundle = load_model(cell, device)?;
    let pb = bar(shared.data.len() as u64, "float ref");
    let out = tch::no_grad(|| shared.data.evaluate(&bundle, &mut NoHook, &pb))?;
    pb.finish_and_clear();
    std::fs::create_dir_all(path.parent().context("reference dir")?)?;
    qvlm_core::io::safetensors::write_safetensors(
        &path,
        &[("log_probs".into(), out.log_probs.shallow_clone())],
        &Default::default(),
    )?;
    shared.reference.insert(cell.model.name.clone(), out.log_probs.shallow_clone());
    Ok(out.log_probs)
}

/// The float reference depends on the model and the evaluated questions only.
fn reference_key(cell: &Cell) -> Result<String> {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_string(&(&cell.model, &cell.dataset))?;
    Ok(Sha256::digest(json.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect())
}

fn run_cell(cfg: &Config, cell: &Cell, device: tch::Device, shared: &mut Shared) -> Result<()> {
    let final_dir = cell_dir(cfg, &cell.id);
    let tmp = final_dir.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    tch::manual_seed(cell.seed as i64);
    let reference_lp = reference(cfg, cell, device, shared)?;
    let mut bundle = load_model(cell, device)?;
    let mut timings = BTreeMap::new();
    let mut plan: Option<QuantPlan> = None;
    let mut nonfinite = 0u64;
    let mut hook: Box<dyn qvlm_core::hook::LinearHook> = Box::new(NoHook);
    if let (Some(spec), Some(bits)) = (&cell.spec, cell.bits) {
        let scheme = spec.scheme(bits, &cell.quant)?;
        let calib = shared.data.calibration(&bundle, cell.calibration.samples, cell.seed)?;
        nonfinite =
            calib.pixels.isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]) as u64;
        let weights = match spec.weights {
            WeightFormat::Awq => WeightMethod::Awq { grid: 20, clip_steps: 11 },
            _ => WeightMethod::Plain,
        };
        let pb = bar(1, "search");
        let mut progress = |done: usize, total: usize, what: &str| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            pb.set_message(what.to_string());
        };
        let start = Instant::now();
        let p = strategy::run(
            &mut bundle.model,
            &calib,
            scheme,
            weights,
            &spec.strategy,
            &mut progress,
        )?;
        pb.finish_and_clear();
        timings.insert("search_seconds", start.elapsed().as_secs_f64());
        nonfinite += p.nonfinite_inputs;
        hook = Box::new(apply(&mut bundle.model, &p)?);
        write_atomic(&tmp.join("plan.json"), serde_json::to_string_pretty(&p)?.as_bytes())?;
        plan = Some(p);
    }
    let start = Instant::now();
    let pb = bar(shared.data.len() as u64, "evaluate");
    let out = tch::no_grad(|| shared.data.evaluate(&bundle, hook.as_mut(), &pb))?;
    pb.finish_and_clear();
    timings.insert("eval_seconds", start.elapsed().as_secs_f64());
    let (kl, agree) = crate::eval::vqa::first_token_agreement(&reference_lp, &out.log_probs);
    let bits = bits_label(cell);
    let mut rows = Vec::new();
    let mut push = |metric: &str, value: f64| {
        rows.push(MetricRow {
            cell: cell.id.clone(),
            model: cell.model.name.clone(),
            bits: bits.clone(),
            method: cell.method.clone(),
            metric: metric.into(),
            value,
        });
    };
    for (metric, value) in &out.metrics {
        push(metric, *value);
    }
    push("kl_vs_float", kl);
    push("top1_agreement", agree);
    let mem = model_bytes(&bundle.model, plan.as_ref())?;
    push("weight_bytes", mem.total as f64);
    for (tower, b) in &mem.by_tower {
        push(&format!("weight_bytes_{tower}"), *b as f64);
    }
    if let Some(p) = &plan {
        push("candidate_evaluations", p.cost.candidate_evaluations as f64);
        push("block_forwards", p.cost.block_forwards as f64);
        push("layer_forwards", p.cost.layer_forwards as f64);
        push("model_passes", p.cost.model_passes as f64);
        push("peak_cache_bytes", p.cost.peak_cache_bytes as f64);
        push("groups", p.groups.len() as f64);
        let joint: Vec<_> = p.groups.iter().filter(|g| g.sites.len() > 1).collect();
        push("joint_groups", joint.len() as f64);
        let mean_depth = if p.groups.is_empty() {
            0.0
        } else {
            p.groups.iter().map(|g| g.sites.len()).sum::<usize>() as f64 / p.groups.len() as f64
        };
        push("mean_group_depth", mean_depth);
        timings.insert("search_wall_seconds_reported", p.cost.wall_seconds);
        if !p.ded.is_empty() {
            let mut ded = String::from("site,sample,ded,entropy\n");
            for d in &p.ded {
                ded.push_str(&format!(
                    "{},{},{},{}\n",
                    d.site,
                    d.sample,
                    format_value(d.ded),
                    format_value(d.entropy)
                ));
            }
            write_atomic(&tmp.join("ded.csv"), ded.as_bytes())?;
        }
    }
    push("nonfinite_calibration_values", nonfinite as f64);
    let manifest = Manifest {
        experiment: cfg.experiment.name.clone(),
        cell: cell.id.clone(),
        git_revision: git_revision(),
        tch: "0.26.0".into(),
        libtorch: qvlm_core::device::libtorch_version(),
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
        seed: cell.seed,
        nonfinite_calibration_values: nonfinite,
    };
    write_atomic(&tmp.join("answers.csv"), out.answers_csv.as_bytes())?;
    write_atomic(&tmp.join("config.json"), serde_json::to_string_pretty(cell)?.as_bytes())?;
    write_atomic(&tmp.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    write_atomic(&tmp.join("timings.json"), serde_json::to_string_pretty(&timings)?.as_bytes())?;
    // metrics.csv last: its presence marks the cell complete inside the folder too.
    write_atomic(&tmp.join("metrics.csv"), metric_csv(&rows).as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("removing incomplete {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    let accuracy = out.metrics.iter().find(|(m, _)| m == "accuracy").map_or(f64::NAN, |(_, v)| *v);
    tracing::info!(accuracy, kl, agree, "cell {} done", cell.id);
    Ok(())
}
