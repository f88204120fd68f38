//! `experiments slurm CONFIG`: a grid's unfinished cells as a Slurm job array, one task per
//! cell, and a report job that runs after the array whatever its tasks' exit states
//! (`--dependency=afterany`). Re-submitting after a failure or a `scancel` runs just what is
//! missing: a cell is finished once its `metrics.csv` is in place, and a killed task's cell lock
//! is taken over by the task that runs it next (see [`crate::lock::LeaseLock`]).
//!
//! Everything is written to `<results>/slurm/submission-<n>/`: `array.sbatch`, `report.sbatch`,
//! `submit.sh` (the exact commands), `cells.txt` and the tasks' logs in `logs/`. The scripts run
//! this binary with absolute paths from the folder the command was given in, so the binary,
//! config, models, data and results folder must be where the compute nodes see them at the same
//! paths (a shared filesystem); `sbatch` passes the submitting shell's environment on.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::grid::Cell;
use crate::results::ResultsDir;

/// The resources and options of the job array (each `None` leaves it to the cluster's default).
#[derive(Clone, Debug, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    /// GPUs per array task (`--gpus-per-task`); the config's `experiment.device` decides whether
    /// the run uses them (`auto` does when CUDA is there).
    pub gpus_per_task: Option<u32>,
    pub cpus_per_task: Option<u32>,
    /// `--mem`, e.g. `32G`.
    pub mem: Option<String>,
    /// `--time`, e.g. `04:00:00`.
    pub time: Option<String>,
    /// At most this many array tasks at once (`--array=…%K`).
    pub max_running: Option<u32>,
    /// More `#SBATCH` options, each written as given (e.g. `--account=lab`).
    pub extra: Vec<String>,
    /// The lease of the tasks' cell locks (`experiments run --lease-seconds`).
    pub lease_seconds: u64,
}

/// The scripts written for one submission.
#[derive(Debug)]
pub struct Submission {
    pub dir: PathBuf,
    /// `None` when every cell is finished (only the report job is left to run).
    pub array: Option<PathBuf>,
    pub report: PathBuf,
    /// The unfinished cells, in array-index order.
    pub cells: Vec<String>,
    /// The exact shell command that submits them.
    pub command: String,
}

/// Slurm's default `MaxArraySize` allows indices 0..=1000.
const MAX_ARRAY_TASKS: usize = 1001;

/// `'text'` for bash, with inner single quotes escaped.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn quote_path(path: &Path) -> Result<String> {
    Ok(quote(path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))?))
}

/// A value written into a `#SBATCH` line: one word, no line breaks.
fn option_value<'a>(flag: &str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        bail!("--{flag} `{value}`: one word without spaces, as sbatch takes it");
    }
    Ok(value)
}

/// Writes the submission's scripts for the grid's unfinished cells. `exe` is this binary and
/// `workdir` the folder relative config paths are resolved from (both absolute).
pub fn write(
    cfg: &Config,
    cells: &[Cell],
    results: &ResultsDir,
    opts: &SlurmOptions,
    exe: &Path,
    workdir: &Path,
) -> Result<Submission> {
    // The array's tasks never look at the cells finished before it: a model changed since they
    // ran is refused here, before anything is submitted.
    crate::run::check_done_cells(cells, results)?;
    let todo: Vec<String> =
        cells.iter().filter(|c| !results.is_done(&c.id)).map(|c| c.id.clone()).collect();
    if todo.len() > MAX_ARRAY_TASKS {
        bail!(
            "{} unfinished cells: more than a Slurm array takes by default ({MAX_ARRAY_TASKS}); \
             run shards instead (an array of N tasks each running `experiments run CONFIG` takes \
             its shard from SLURM_ARRAY_TASK_ID/COUNT)",
            todo.len()
        );
    }
    let root = std::path::absolute(results.root())
        .with_context(|| format!("resolving {}", results.root().display()))?;
    let config = std::path::absolute(&cfg.file)
        .with_context(|| format!("resolving {}", cfg.file.display()))?;
    let base = root.join("slurm");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let dir = (1..)
        .map(|n| base.join(format!("submission-{n:03}")))
        .find(|d| std::fs::create_dir(d).is_ok())
        .context("a submission folder")?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    let mut resources = Vec::new();
    if let Some(p) = &opts.partition {
        resources.push(format!("--partition={}", option_value("partition", p)?));
    }
    if let Some(c) = opts.cpus_per_task {
        resources.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &opts.mem {
        resources.push(format!("--mem={}", option_value("mem", m)?));
    }
    if let Some(t) = &opts.time {
        resources.push(format!("--time={}", option_value("time", t)?));
    }
    for e in &opts.extra {
        if !e.starts_with("--") {
            bail!("--sbatch `{e}`: an sbatch option, starting with --");
        }
        resources.push(option_value("sbatch", e)?.to_string());
    }
    let header = |name: &str, output: &str, more: &[String]| -> String {
        let mut s = String::from("#!/bin/bash\n");
        s.push_str(&format!(
            "# Written by `experiments slurm` for {}: see the results folder's slurm/.\n",
            config.display()
        ));
        s.push_str(&format!("#SBATCH --job-name={name}\n#SBATCH --ntasks=1\n"));
        s.push_str(&format!("#SBATCH --output={}\n", logs.join(output).display()));
        for r in resources.iter().chain(more) {
            s.push_str(&format!("#SBATCH {r}\n"));
        }
        s
    };
    let name = format!("qvlm-{}", cfg.experiment.name);
    let exe_q = quote_path(exe)?;
    let config_q = quote_path(&config)?;
    let workdir_q = quote_path(workdir)?;
    let array = if todo.is_empty() {
        None
    } else {
        let mut more = vec![format!(
            "--array=0-{}{}",
            todo.len() - 1,
            opts.max_running.map(|k| format!("%{k}")).unwrap_or_default()
        )];
        if let Some(g) = opts.gpus_per_task {
            more.push(format!("--gpus-per-task={g}"));
        }
        let mut s = header(&name, "%A_%a.log", &more);
        s.push_str("set -euo pipefail\n");
        s.push_str(&format!("cd {workdir_q}\n"));
        s.push_str("# One unfinished cell per array task, in the grid's order.\n");
        s.push_str(&format!("cells=({})\n", todo.join(" ")));
        s.push_str(&format!(
            "exec {exe_q} run {config_q} --cell \"${{cells[$SLURM_ARRAY_TASK_ID]}}\" --lease-seconds {}\n",
            opts.lease_seconds
        ));
        let path = dir.join("array.sbatch");
        std::fs::write(&path, s).with_context(|| format!("writing {}", path.display()))?;
        Some(path)
    };
    let mut s = header(&format!("{name}-report"), "report_%j.log", &[]);
    s.push_str("set -euo pipefail\n");
    s.push_str(&format!("cd {workdir_q}\n"));
    s.push_str(&format!("exec {exe_q} report {config_q}\n"));
    let report = dir.join("report.sbatch");
    std::fs::write(&report, s).with_context(|| format!("writing {}", report.display()))?;
    let cells_txt = dir.join("cells.txt");
    let listed: String = todo.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(&cells_txt, listed)
        .with_context(|| format!("writing {}", cells_txt.display()))?;
    let command = match &array {
        Some(a) => format!(
            "job=$(sbatch --parsable {}) && sbatch --parsable --dependency=afterany:${{job%%;*}} {}",
            quote_path(a)?,
            quote_path(&report)?
        ),
        None => format!("sbatch --parsable {}", quote_path(&report)?),
    };
    let submit = dir.join("submit.sh");
    std::fs::write(&submit, format!("#!/bin/bash\nset -euo pipefail\n{command}\n"))
        .with_context(|| format!("writing {}", submit.display()))?;
    Ok(Submission { dir, array, report, cells: todo, command })
}

/// The job ids of a submission.
#[derive(Debug)]
pub struct Submitted {
    pub array_job: Option<String>,
    pub report_job: String,
}

/// Runs `sbatch --parsable SCRIPT ARGS…` and returns the job id.
fn sbatch(script: &Path, args: &[String]) -> Result<String> {
    let out = std::process::Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "running sbatch: {e} (is Slurm installed here and SLURM_CONF set? scripts/slurm-local.sh start brings up a single-node Slurm)"
            )
        })?;
    if !out.status.success() {
        bail!(
            "sbatch {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch {}: no job id in its output {:?}", script.display(), text.trim());
    }
    Ok(id)
}

/// Submits the array, then the report job after it (`afterany`: whatever the tasks' states).
pub fn submit(s: &Submission) -> Result<Submitted> {
    let array_job = s.array.as_deref().map(|a| sbatch(a, &[])).transpose()?;
    let dependency: Vec<String> =
        array_job.iter().map(|j| format!("--dependency=afterany:{j}")).collect();
    let report_job = sbatch(&s.report, &dependency)?;
    Ok(Submitted { array_job, report_job })
}
