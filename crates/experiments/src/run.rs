//! The grid runner: every cell of a config (or a shard of them), each written to its results
//! folder's `cells/<id>/` atomically under its own lock, finished cells skipped on a re-run, then
//! the tables, figures and report once the grid is complete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qvlm_core::hook::NoHook;
use qvlm_core::quant::spec::{Granularity, WeightSpec};
use qvlm_search::plan::{apply, ActScheme, ModelIdentity, QuantPlan};
use qvlm_search::strategy;
use serde::Serialize;
use tch::Tensor;

use crate::config::Config;
use crate::eval::dataset::EvalData;
use crate::fingerprint::Fingerprints;
use crate::grid::{short_hash, Cell, CellKind, Selection};
use crate::memory::model_bytes;
use crate::progress;
use crate::results::{CellLock, Finished, Owner, ResultsDir};
use crate::vlm::Vlm;

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
    /// Calibration pairs requested and used (0 for the float reference).
    pub calibration_samples_requested: usize,
    pub calibration_samples_used: usize,
    /// Where it ran: the host, and the Slurm job (`JOB` or `ARRAYJOB_TASK`) when one ran it.
    pub host: String,
    pub slurm_job: Option<String>,
    /// The model directory's [`crate::fingerprint::checkpoint_fingerprint`]: a later run skips
    /// this cell only while the model at its path is still the same.
    pub checkpoint_fingerprint: String,
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
    /// Model fingerprints, taken once per process (and again before each cell loads its model).
    fingerprints: Fingerprints,
    /// Done cells whose manifest predates fingerprints (not checked; said once).
    unchecked: Vec<String>,
    /// How long this process's locks last without a heartbeat, and how often it looks again at
    /// what another process holds.
    lease: Duration,
    poll: Duration,
}

/// Whether a done cell ran on the model now at its path (`Ok(false)`: its manifest predates
/// fingerprints, nothing to compare). A model retrained or replaced at the same path is an error
/// naming the cell, not a silent mix of two models' results.
fn check_done_cell(
    results: &ResultsDir,
    cell: &Cell,
    fingerprints: &mut Fingerprints,
) -> Result<bool> {
    let path = results.cell(&cell.id).join("manifest.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Some(recorded) = manifest.get("checkpoint_fingerprint").and_then(|v| v.as_str()) else {
        return Ok(false);
    };
    let now = fingerprints.of(&cell.model)?;
    if recorded != now {
        bail!(
            "cell {} ({}) is done, but on another model: {} has changed since it ran (checkpoint fingerprint {recorded} then, {now} now). Move {} away to recompute it on this model, or restore the model it ran on",
            cell.id,
            cell.title(),
            cell.model.path.display(),
            results.cell(&cell.id).display()
        );
    }
    Ok(true)
}

/// [`check_done_cell`] for every done cell of `cells`: before tables and reports are built from
/// them and before a Slurm array is submitted for the rest (shards and array tasks never look at
/// the cells others finished). Cells recorded before fingerprints are counted in one warning.
pub fn check_done_cells(cells: &[Cell], results: &ResultsDir) -> Result<()> {
    let mut fingerprints = Fingerprints::default();
    let mut unchecked = Vec::new();
    for cell in cells.iter().filter(|c| results.is_done(&c.id)) {
        if !check_done_cell(results, cell, &mut fingerprints)? {
            unchecked.push(cell.id.as_str());
        }
    }
    warn_unchecked(&unchecked);
    Ok(())
}

fn warn_unchecked(ids: &[&str]) {
    if let Some(first) = ids.first() {
        tracing::warn!(
            "{} done cells were recorded before checkpoint fingerprints (e.g. {first}): used without checking that their model is unchanged",
            ids.len()
        );
    }
}

/// How a grid is run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The cells this process runs (the others are someone else's).
    pub selection: Selection,
    /// The lease of this process's cell locks (see [`crate::lock::LeaseLock`]): another process
    /// takes a cell over once this one has not renewed it for this long.
    pub lease: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { selection: Selection::All, lease: Duration::from_secs(120) }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// The cells this process ran.
    pub ran: Vec<String>,
    /// Selected cells that were finished already, or that another process finished meanwhile.
    pub done_elsewhere: Vec<String>,
    /// The grid's cells not finished when this process stopped (`<id> <title>`).
    pub missing: Vec<String>,
    /// Whether this process wrote the tables, figures and report.
    pub wrote_outputs: bool,
}

/// Runs the selected cells that are not finished, each under its cell lock, so any number of
/// processes (shards, Slurm array tasks, a second local run) may run one config into one
/// results folder at once: a cell another process is running is waited for, and taken over if
/// that process dies. Once the whole grid is finished, writes the tables, figures and report.
pub fn run(cfg: &Config, cells: &[Cell], opts: &RunOptions) -> Result<RunSummary> {
    let device = cfg.experiment.device.resolve()?;
    if cfg.experiment.threads > 0 {
        tch::set_num_threads(i32::from(cfg.experiment.threads));
    }
    let owner = Owner::new("experiments", &cfg.experiment.name, &cfg.file, &cfg.text);
    let results = ResultsDir::open_shared(&cfg.experiment.results_dir(), &owner)?;
    let mine = opts.selection.pick(cells)?;
    let poll = (opts.lease / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut shared = Shared {
        data: EvalData::load(&cfg.dataset)?,
        reference: BTreeMap::new(),
        fingerprints: Fingerprints::default(),
        unchecked: Vec::new(),
        lease: opts.lease,
        poll,
    };
    if shared.data.is_empty() {
        bail!("{}: the dataset has no questions to evaluate", cfg.file.display());
    }
    for cell in &mine {
        check_widths(cell)?;
    }
    let mut summary = RunSummary::default();
    let total = mine.len();
    let mut waiting: Vec<(usize, &Cell)> = Vec::new();
    for (i, &cell) in mine.iter().enumerate() {
        let step = format!("[{}/{total}] {}", i + 1, cell.title());
        if !try_cell(cfg, cell, &step, device, &results, &mut shared, &mut summary)? {
            waiting.push((i, cell));
        }
    }
    // Cells another live process holds: look again until they are finished (by it) or free (it
    // died and its lease ran out: run them here).
    let mut last_said = Instant::now() - Duration::from_secs(3600);
    while !waiting.is_empty() {
        if last_said.elapsed() >= Duration::from_secs(60) {
            let held: Vec<String> = waiting
                .iter()
                .map(|(_, c)| {
                    let who = results.cell_holder(&c.id).unwrap_or_else(|| "nobody now".into());
                    format!("{} ({who})", c.id)
                })
                .collect();
            tracing::info!(
                "waiting for {} cells other processes are running: {}",
                held.len(),
                held.join(", ")
            );
            last_said = Instant::now();
        }
        std::thread::sleep(poll);
        let mut still = Vec::new();
        for (i, cell) in waiting {
            let step = format!("[{}/{total}] {}", i + 1, cell.title());
            if !try_cell(cfg, cell, &step, device, &results, &mut shared, &mut summary)? {
                still.push((i, cell));
            }
        }
        waiting = still;
    }
    summary.missing = missing(cells, &results);
    if summary.missing.is_empty() {
        write_outputs(cfg, cells, &results, poll, opts.lease)?;
        summary.wrote_outputs = true;
    } else {
        // (With every cell done, write_outputs checks them all and says this itself.)
        warn_unchecked(&shared.unchecked.iter().map(String::as_str).collect::<Vec<_>>());
        tracing::info!(
            "{} of the grid's {} cells are not finished yet; `experiments report {}` builds the tables from what exists",
            summary.missing.len(),
            cells.len(),
            cfg.file.display()
        );
    }
    Ok(summary)
}

/// Runs `cell` unless it is finished (`true`) or another live process holds it (`false`).
fn try_cell(
    cfg: &Config,
    cell: &Cell,
    step: &str,
    device: tch::Device,
    results: &ResultsDir,
    shared: &mut Shared,
    summary: &mut RunSummary,
) -> Result<bool> {
    if results.is_done(&cell.id) {
        if !check_done_cell(results, cell, &mut shared.fingerprints)? {
            shared.unchecked.push(cell.id.clone());
        }
        // A process killed between finishing the cell and releasing its lock leaves a stale lock
        // on a done cell: taking it over and dropping it releases it (a live one is left alone).
        drop(results.try_lock_cell(&cell.id, shared.lease)?);
        tracing::info!("{step}: done already, skipped");
        summary.done_elsewhere.push(cell.id.clone());
        return Ok(true);
    }
    let Some(lock) = results.try_lock_cell(&cell.id, shared.lease)? else {
        return Ok(false);
    };
    // It may have been finished between the look and the lock.
    if results.is_done(&cell.id) {
        check_done_cell(results, cell, &mut shared.fingerprints)?;
        summary.done_elsewhere.push(cell.id.clone());
        return Ok(true);
    }
    tracing::info!("{step}: running");
    let finished = run_cell(cfg, cell, device, results, &lock, shared)
        .with_context(|| format!("cell {} ({})", cell.id, cell.title()))?;
    match finished {
        Finished::Written => summary.ran.push(cell.id.clone()),
        Finished::KeptTheOther => {
            check_done_cell(results, cell, &mut shared.fingerprints)?;
            tracing::warn!("{step}: another process finished it first; its result is kept");
            summary.done_elsewhere.push(cell.id.clone());
        }
    }
    Ok(true)
}

/// The grid's unfinished cells, `<id> <title>`.
pub fn missing(cells: &[Cell], results: &ResultsDir) -> Vec<String> {
    cells
        .iter()
        .filter(|c| !results.is_done(&c.id))
        .map(|c| format!("{} {}", c.id, c.title()))
        .collect()
}

/// Writes the tables, figures and report from the finished cells (under the folder's outputs
/// lock: a process that finds it held waits, then writes them again from what exists then).
pub fn write_outputs(
    cfg: &Config,
    cells: &[Cell],
    results: &ResultsDir,
    poll: Duration,
    lease: Duration,
) -> Result<()> {
    let _lock = loop {
        if let Some(lock) = results.try_lock_outputs(lease)? {
            break lock;
        }
        std::thread::sleep(poll);
    };
    check_done_cells(cells, results)?;
    let missing = missing(cells, results);
    let tables = crate::table::Tables::build(results, cells, &cfg.outputs.rows)?;
    tables.write(results, cfg)?;
    crate::report::write_all(cfg, &tables, results, &missing)
}

/// `experiments report CONFIG`: the tables, figures and report from whatever cells are finished;
/// returns the unfinished ones (`<id> <title>`).
pub fn report(cfg: &Config, cells: &[Cell]) -> Result<Vec<String>> {
    let owner = Owner::new("experiments", &cfg.experiment.name, &cfg.file, &cfg.text);
    let results = ResultsDir::open_shared(&cfg.experiment.results_dir(), &owner)?;
    let opts = RunOptions::default();
    write_outputs(cfg, cells, &results, Duration::from_secs(1), opts.lease)?;
    Ok(missing(cells, &results))
}

/// Refuses, before any cell runs, a weight or activation group size that does not divide the
/// input width of a layer it applies to (widths read from the model's config.json).
fn check_widths(cell: &Cell) -> Result<()> {
    let CellKind::Quantized { bits, method } = &cell.kind else { return Ok(()) };
    let config = cell.model.path.join("config.json");
    let scheme = method.scheme(*bits, &cell.quant)?;
    let (vision, projector, language) = match qvlm_core::io::config::detect_family(&config)? {
        qvlm_core::io::config::ModelFamily::Qwen2Vl => {
            let cfg = qvlm_core::io::config::Qwen2VlConfig::from_json(&config)?;
            let (v, t) = (&cfg.vision, &cfg.text);
            let merged = v.embed_dim * v.spatial_merge_size * v.spatial_merge_size;
            (
                vec![("embed_dim", v.embed_dim), ("intermediate_size", v.intermediate_size)],
                vec![("merged patch width", merged)],
                vec![
                    ("hidden_size", t.hidden_size),
                    ("intermediate_size", t.intermediate_size),
                    ("attention width", t.num_attention_heads * t.head_dim),
                ],
            )
        }
        qvlm_core::io::config::ModelFamily::Llava => {
            let cfg = match qvlm_core::io::config::detect_format(&config)? {
                qvlm_core::io::config::CheckpointFormat::LlavaHf => {
                    qvlm_core::io::config::LlavaConfig::from_hf_json(&config)?
                }
                // Original LLaVA needs its CLIP directory for the vision widths; checked when
                // quantizing.
                qvlm_core::io::config::CheckpointFormat::Original => return Ok(()),
            };
            let (v, t) = (&cfg.vision, &cfg.text);
            (
                vec![("hidden_size", v.hidden_size), ("intermediate_size", v.intermediate_size)],
                vec![("vision hidden_size", v.hidden_size), ("text hidden_size", t.hidden_size)],
                vec![
                    ("hidden_size", t.hidden_size),
                    ("intermediate_size", t.intermediate_size),
                    ("attention width", t.num_attention_heads * t.head_dim),
                ],
            )
        }
    };
    let towers = [
        ("vision", &scheme.vision, vision),
        ("projector", &scheme.projector, projector),
        ("language", &scheme.language, language),
    ];
    for (tower, ts, widths) in towers {
        let weight_group = match ts.weight {
            Some(WeightSpec::Rtn { granularity: Granularity::PerGroup { size }, .. }) => Some(size),
            _ => None,
        };
        let act_group = match ts.act {
            Some(ActScheme { granularity: Granularity::PerGroup { size }, .. }) => Some(size),
            _ => None,
        };
        for (key, group) in
            [("quant.weight_group", weight_group), ("the activation granularity", act_group)]
        {
            let Some(group) = group else { continue };
            if let Some((name, w)) = widths.iter().find(|(_, w)| w % group != 0) {
                bail!(
                    "key `{key}` (method `{}`): group size {group} does not divide the {tower} {name} {w} of model `{}` ({})",
                    method.name,
                    cell.model.name,
                    config.display()
                );
            }
        }
    }
    Ok(())
}

fn load_model(cell: &Cell, device: tch::Device) -> Result<Vlm> {
    Vlm::load(&cell.model, device)
}

/// Float answer distributions of a model (cached in the results folder: they depend on the model
/// and the evaluated questions only). One process computes them, under the reference's lock;
/// others running at the same time wait for its file.
fn reference(
    cell: &Cell,
    device: tch::Device,
    results: &ResultsDir,
    shared: &mut Shared,
) -> Result<Tensor> {
    if let Some(t) = shared.reference.get(&cell.model.name) {
        return Ok(t.shallow_clone());
    }
    let key = short_hash(&(&cell.model, &cell.dataset, shared.fingerprints.of(&cell.model)?))?;
    let path = results.reference(&key);
    let mut waited = false;
    let _lock = loop {
        if path.is_file() {
            let t = qvlm_core::io::safetensors::SafetensorsFile::open(&path)?.read("log_probs")?;
            shared.reference.insert(cell.model.name.clone(), t.shallow_clone());
            return Ok(t);
        }
        match results.try_lock_reference(&key, shared.lease)? {
            Some(lock) if !path.is_file() => break lock,
            Some(_) => continue,
            None => {
                if !waited {
                    tracing::info!(
                        "waiting for another process's float reference {}",
                        path.display()
                    );
                    waited = true;
                }
                std::thread::sleep(shared.poll);
            }
        }
    };
    let model = load_model(cell, device)?;
    let pb = progress::bar(shared.data.len() as u64, "float ref");
    let out = tch::no_grad(|| shared.data.evaluate(&model, &mut NoHook, &pb))?;
    pb.finish_and_clear();
    let tmp = path.with_extension(format!("tmp-{}", crate::lock::unique_suffix()?));
    qvlm_core::io::safetensors::write_safetensors(
        &tmp,
        &[("log_probs".into(), out.log_probs.shallow_clone())],
        &Default::default(),
    )?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
    shared.reference.insert(cell.model.name.clone(), out.log_probs.shallow_clone());
    Ok(out.log_probs)
}

fn run_cell(
    cfg: &Config,
    cell: &Cell,
    device: tch::Device,
    results: &ResultsDir,
    lock: &CellLock,
    shared: &mut Shared,
) -> Result<Finished> {
    let out_cell = results.begin_cell(lock)?;
    // The model is loaded again for each cell: it must still be the one this process took the
    // fingerprint (and the float reference) of.
    let now = crate::fingerprint::model_fingerprint(&cell.model)?;
    let taken = shared.fingerprints.of(&cell.model)?;
    if now != taken {
        bail!(
            "{} changed during this run (checkpoint fingerprint {taken} when the run first read it, {now} now): stopped before its next cell; re-run to compute the cells on the new model",
            cell.model.path.display()
        );
    }
    tch::manual_seed(cell.seed as i64);
    let reference_lp = reference(cell, device, results, shared)?;
    let mut model = load_model(cell, device)?;
    let mut timings = BTreeMap::new();
    let mut plan: Option<QuantPlan> = None;
    let mut nonfinite = 0u64;
    let mut calibration_used = 0;
    // (VmRSS when the search began, VmHWM when it ended), where /proc reads them.
    let mut search_rss: Option<(u64, u64)> = None;
    // (linear parameters, calibration tokens, forward FLOPs, one block's activation bytes).
    let mut calibration_work: Option<(f64, f64, f64, f64)> = None;
    let mut hook: Box<dyn qvlm_core::hook::LinearHook> = Box::new(NoHook);
    if let CellKind::Quantized { bits, method } = &cell.kind {
        let scheme = method.scheme(*bits, &cell.quant)?;
        let c = &cell.calibration;
        let calib = crate::calib::calibration(
            &shared.data,
            &model,
            c.samples.get(),
            c.allow_fewer,
            cell.seed,
        )?;
        calibration_used = calib.prompts.len();
        // The work and activation size of the calibration set (issue #21's cost model; LLaVA's
        // shapes: not recorded for Qwen2-VL).
        if let Vlm::Llava(bundle) = &model {
            let shape = crate::scaling::ForwardShape::of(&bundle.model.cfg);
            let seq_lens: Vec<i64> = calib
                .prompts
                .iter()
                .map(|pieces| {
                    pieces
                        .iter()
                        .map(|p| match p {
                            qvlm_core::io::prompt::Piece::Tokens(t) => t.len() as i64,
                            qvlm_core::io::prompt::Piece::Image(_) => shape.image_tokens,
                        })
                        .sum()
                })
                .collect();
            calibration_work = Some((
                shape.linear_parameters(),
                seq_lens.iter().sum::<i64>() as f64,
                shape.flops(&seq_lens),
                shape.block_activation_bytes(&seq_lens, bundle.model.kind().elt_size_in_bytes()),
            ));
        }
        nonfinite =
            calib.pixels.isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]) as u64;
        let pb = progress::bar(1, "search");
        let mut progress = |done: usize, total: usize, what: &str| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            pb.set_message(what.to_string());
        };
        // The model as searched on (after outlier planting), for `experiments quantize`.
        let identity = ModelIdentity::of(
            model.search_model(),
            &cell.model.name,
            &cell.model.path.display().to_string(),
        )?;
        if let Some(r) = &method.rotation {
            model.search_model_mut().rotate(&r.spec(cell.seed))?;
        }
        // The search's own peak resident memory (issue #21: bounded memory): the peak is reset
        // here, with the model, the calibration pairs and the float reference already resident.
        crate::bench::machine::reset_peak_rss()?;
        let rss_at_start = crate::bench::machine::rss_bytes();
        let start = Instant::now();
        let mut p = strategy::run(
            model.search_model_mut(),
            &calib,
            scheme,
            method.weights.search_method(),
            &method.strategy,
            &mut progress,
        )?;
        pb.finish_and_clear();
        timings.insert("search_seconds", start.elapsed().as_secs_f64());
        search_rss = rss_at_start.zip(crate::bench::machine::peak_rss_bytes());
        nonfinite += p.nonfinite_inputs;
        p.model = Some(identity);
        hook = Box::new(apply(model.search_model_mut(), &p)?);
        out_cell.write("plan.json", serde_json::to_string_pretty(&p)?.as_bytes())?;
        plan = Some(p);
    }
    let start = Instant::now();
    let pb = progress::bar(shared.data.len() as u64, "evaluate");
    let out = tch::no_grad(|| shared.data.evaluate(&model, hook.as_mut(), &pb))?;
    pb.finish_and_clear();
    timings.insert("eval_seconds", start.elapsed().as_secs_f64());
    let (kl, agree) = crate::eval::generate::first_token_agreement(&reference_lp, &out.log_probs);
    let bits = cell.bits_label();
    let mut rows = Vec::new();
    let mut push = |metric: &str, value: f64| {
        rows.push(MetricRow {
            cell: cell.id.clone(),
            model: cell.model.name.clone(),
            bits: bits.clone(),
            method: cell.method_name().to_string(),
            metric: metric.into(),
            value,
        });
    };
    for (metric, value) in &out.metrics {
        push(metric, *value);
    }
    push("kl_vs_float", kl);
    push("top1_agreement", agree);
    let mem = model_bytes(model.search_model(), plan.as_ref())?;
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
        push("heap_trims", p.cost.heap_trims as f64);
        if let Some((params, tokens, flops, block)) = calibration_work {
            push("linear_parameters", params);
            push("calibration_tokens", tokens);
            push("calibration_forward_flops", flops);
            push("block_activation_bytes", block);
        }
        // Measurements, not results: with the times (metrics.csv is compared byte for byte).
        if let Some((start, peak)) = search_rss {
            timings.insert("search_rss_start_bytes", start as f64);
            timings.insert("search_peak_rss_bytes", peak as f64);
            // The model as held in memory for the search (every tensor, in its dtype).
            let resident: usize = model
                .search_model()
                .named_tensors()
                .iter()
                .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
                .sum();
            timings.insert("search_model_tensor_bytes", resident as f64);
        }
        push("dependency_evaluations", p.cost.dependency_evaluations as f64);
        push("dependency_elements", p.cost.dependency_elements as f64);
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
            let mut ded =
                String::from("site,sample,window,ded,entropy,layerwise_error,joint_error,energy\n");
            for d in &p.ded {
                ded.push_str(&format!(
                    "{},{},{},{},{},{},{},{}\n",
                    d.site,
                    d.sample,
                    d.window,
                    // Shortest round-trip form: DED values span many decades.
                    d.ded,
                    d.entropy,
                    d.layerwise_error,
                    d.joint_error,
                    d.energy
                ));
            }
            out_cell.write("ded.csv", ded.as_bytes())?;
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
        calibration_samples_requested: match cell.kind {
            CellKind::Float => 0,
            CellKind::Quantized { .. } => cell.calibration.samples.get(),
        },
        calibration_samples_used: calibration_used,
        host: crate::lock::host_name()?.to_string(),
        slurm_job: crate::lock::slurm_job(),
        checkpoint_fingerprint: shared.fingerprints.of(&cell.model)?,
    };
    // A number that is not finite is not a result: nothing of this cell is kept.
    if let Some(bad) = rows.iter().find(|r| !r.value.is_finite()) {
        bail!(
            "metric `{}` is {} (are the model's outputs finite?); the cell is not saved as a result",
            bad.metric,
            bad.value
        );
    }
    out_cell.write("answers.csv", out.answers_csv.as_bytes())?;
    out_cell.write("scores.csv", crate::eval::dataset::scores_csv(&out.scores).as_bytes())?;
    out_cell.write("config.json", serde_json::to_string_pretty(cell)?.as_bytes())?;
    out_cell.write("manifest.json", serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    out_cell.write("timings.json", serde_json::to_string_pretty(&timings)?.as_bytes())?;
    let finished = out_cell.finish(metric_csv(&rows).as_bytes())?;
    let accuracy = out.metrics.iter().find(|(m, _)| m == "accuracy").map_or(f64::NAN, |(_, v)| *v);
    tracing::info!(accuracy, kl, agree, "cell {} done", cell.id);
    Ok(finished)
}
