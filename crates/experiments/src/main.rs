//! `experiments`: the project's one binary. `experiments CONFIG.toml` runs a config's grid;
//! subcommands generate with a checkpoint, train the embedded tiny LLaVA, and so on.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use experiments::{bench, cli, config, grid, tiny};

#[derive(Parser, Debug)]
#[command(
    name = "experiments",
    version,
    about = "Q-VLM post-training quantization experiments on LLaVA"
)]
struct Args {
    /// A config file to run (e.g. configs/ablation.toml); same as `experiments run CONFIG`.
    config: Option<PathBuf>,
    #[command(flatten)]
    run: RunFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How `experiments [run] CONFIG` runs its grid.
#[derive(clap::Args, Debug, Clone)]
struct RunFlags {
    /// Print the resolved cells (those this process would run) and their ids, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run only shard I of N (cells I, I+N, I+2N, … of the grid's order). Inside a Slurm array
    /// task without this flag the shard comes from SLURM_ARRAY_TASK_ID and
    /// SLURM_ARRAY_TASK_COUNT (or _MIN/_MAX).
    #[arg(long, value_name = "I/N", conflicts_with = "cell")]
    shard: Option<grid::Shard>,
    /// Run only this cell (its id, as `--dry-run` lists them); repeatable.
    #[arg(long, value_name = "ID")]
    cell: Vec<String>,
    /// Seconds this process's cell locks live without a heartbeat (one is written every quarter
    /// of it): after that, another process on another host may take a cell over. A lock of a
    /// process that has ended on the same host is taken over at once.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    lease_seconds: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a config's grid of cells.
    Run {
        config: PathBuf,
        #[command(flatten)]
        run: RunFlags,
    },
    /// Build the tables, figures and report.md from the cells finished so far, and list the
    /// missing ones (after shards or a Slurm array).
    Report { config: PathBuf },
    /// Write a Slurm job array over the grid's unfinished cells and a report job after it, and
    /// print the sbatch command (run it with --submit).
    Slurm(SlurmArgs),
    /// Answer a prompt about an image with a checkpoint directory.
    Generate(cli::GenerateArgs),
    /// Apply a stored plan to its model (no search) and write a checkpoint: compressed-tensors
    /// (vLLM, SGLang, transformers), qvlm (packed) or llava-hf (dequantized).
    Quantize(experiments::quantize::QuantizeArgs),
    /// Train the embedded tiny LLaVA on easy-VQA (configs/train-tiny.toml), or fine-tune its
    /// trained-outlier variant (configs/train-tiny-trained-outliers.toml).
    TrainTiny {
        #[arg(default_value = "configs/train-tiny.toml")]
        config: PathBuf,
        /// Replace an existing `out` folder (only once the new model is trained and saved).
        #[arg(long)]
        force: bool,
    },
    /// Memory and generation speed of FP32/BF16/W8A16/W8A8/W4A16 on LLaVA-shaped models with
    /// random weights, against the measured memory bandwidth (configs/efficiency.toml).
    Bench {
        #[arg(default_value = "configs/efficiency.toml")]
        config: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct SlurmArgs {
    config: PathBuf,
    /// Partition (queue) of the tasks.
    #[arg(long)]
    partition: Option<String>,
    /// GPUs per array task.
    #[arg(long)]
    gpus_per_task: Option<u32>,
    /// CPUs per array task.
    #[arg(long)]
    cpus_per_task: Option<u32>,
    /// Memory per task (sbatch --mem, e.g. 32G).
    #[arg(long)]
    mem: Option<String>,
    /// Time limit per task (sbatch --time, e.g. 04:00:00).
    #[arg(long)]
    time: Option<String>,
    /// Run at most K array tasks at once (--array=…%K).
    #[arg(long, value_name = "K")]
    max_running: Option<u32>,
    /// Another #SBATCH option for both jobs, as sbatch takes it (e.g. --sbatch=--account=lab);
    /// repeatable.
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    sbatch: Vec<String>,
    /// The lease of the tasks' cell locks (see `experiments run --help`).
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    lease_seconds: u64,
    /// Submit the jobs (sbatch) and print their ids.
    #[arg(long)]
    submit: bool,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole context chain on one line: "loading X: X/config.json: not valid JSON: …".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours on a terminal only: Slurm's log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match (args.command, args.config) {
        (Some(Command::Run { config, mut run }), _) => {
            run.dry_run |= args.run.dry_run;
            run_config(&config, &run)
        }
        (Some(Command::Report { config }), _) => report(&config),
        (Some(Command::Slurm(s)), _) => slurm(&s),
        (Some(Command::Quantize(q)), _) => {
            let r = experiments::quantize::quantize(&q)?;
            say(format!(
                "{}: {} quantized layers of plan `{}` ({}), {:.2} MiB written = {:.3}× the fp16 size ({:.2} MiB)",
                q.out.display(),
                r.packed_layers,
                r.plan.display(),
                r.strategy,
                r.bytes as f64 / 1048576.0,
                r.bytes as f64 / r.fp16_bytes as f64,
                r.fp16_bytes as f64 / 1048576.0
            ));
            if !r.vllm_marlin_misfits.is_empty() {
                say(format!(
                    "note: {} layers miss vLLM's fast int4/int8 kernel shapes (listed in quantize.json), e.g. {}",
                    r.vllm_marlin_misfits.len(),
                    r.vllm_marlin_misfits[0]
                ));
            }
            Ok(())
        }
        (Some(Command::Generate(g)), _) => {
            say(cli::generate(&g)?);
            Ok(())
        }
        (Some(Command::TrainTiny { config, force }), _) => {
            if let Some(cfg) = tiny::trained_outliers::load_if_finetune(&config)? {
                let record = tiny::trained_outliers::train(&cfg, force)?;
                say(serde_json::to_string_pretty(&record.test_accuracy)?);
                say(format!(
                    "fine-tuned in {:.1} min ({} + {} steps; base {:.2} % -> {:.2} % on the test split), saved to {}",
                    record.train_seconds / 60.0,
                    record.vision_steps,
                    record.lm_steps,
                    record.base_test_accuracy.overall,
                    record.test_accuracy.overall,
                    cfg.out.display()
                ));
                return Ok(());
            }
            let cfg = tiny::train::load_config(&config)?;
            let record = tiny::train::train(&cfg, force)?;
            say(serde_json::to_string_pretty(&record.test_accuracy)?);
            say(format!(
                "trained in {:.1} min ({} parameters), saved to {}",
                record.train_seconds / 60.0,
                record.parameters,
                cfg.out.display()
            ));
            Ok(())
        }
        (Some(Command::Bench { config }), _) => run_bench(&config),
        (None, Some(config)) => run_config(&config, &args.run),
        (None, None) => {
            anyhow::bail!("nothing to do: pass a config (e.g. `experiments configs/ablation.toml`) or a subcommand (--help)")
        }
    }
}

fn run_config(path: &std::path::Path, flags: &RunFlags) -> Result<()> {
    let cfg = config::load(path)?;
    let cells = grid::cells(&cfg)?;
    let selection = if !flags.cell.is_empty() {
        grid::Selection::Cells(flags.cell.clone())
    } else if let Some(shard) = flags.shard {
        grid::Selection::Shard(shard)
    } else if let Some(shard) = grid::Shard::from_slurm_env()? {
        tracing::info!("shard {shard}, from the Slurm array task's SLURM_ARRAY_TASK_* variables");
        grid::Selection::Shard(shard)
    } else {
        grid::Selection::All
    };
    let mine: Vec<grid::Cell> = selection.pick(&cells)?.into_iter().cloned().collect();
    if selection == grid::Selection::All {
        say(grid::plan_text(&cfg, &cells).trim_end());
    } else {
        say(format!(
            "experiment `{}` from {} — {}: {} of the grid's {} cells",
            cfg.experiment.name,
            cfg.file.display(),
            selection.describe(),
            mine.len(),
            cells.len()
        ));
        say(grid::plan_text(&cfg, &mine).lines().skip(1).collect::<Vec<_>>().join("\n"));
    }
    if flags.dry_run {
        return Ok(());
    }
    config::check_paths(&cfg)?;
    if flags.lease_seconds == 0 {
        anyhow::bail!("--lease-seconds 0: a lease must be at least a second");
    }
    let opts = experiments::run::RunOptions {
        selection,
        lease: std::time::Duration::from_secs(flags.lease_seconds),
    };
    let summary = experiments::run::run(&cfg, &cells, &opts)?;
    say(format!(
        "ran {} cells{}{}",
        summary.ran.len(),
        if summary.ran.is_empty() { String::new() } else { format!(": {}", summary.ran.join(" ")) },
        if summary.done_elsewhere.is_empty() {
            String::new()
        } else {
            format!("; {} finished already or by another process", summary.done_elsewhere.len())
        }
    ));
    if !summary.missing.is_empty() {
        say(format!(
            "the grid is not complete: {} of {} cells missing (`experiments report {}` builds the tables from what exists)",
            summary.missing.len(),
            cells.len(),
            path.display()
        ));
    }
    say(format!("results in {}", cfg.experiment.results_dir().display()));
    Ok(())
}

fn report(path: &std::path::Path) -> Result<()> {
    let cfg = config::load(path)?;
    let cells = grid::cells(&cfg)?;
    let missing = experiments::run::report(&cfg, &cells)?;
    say(format!(
        "tables, figures and report.md of {} of {} cells in {}",
        cells.len() - missing.len(),
        cells.len(),
        cfg.experiment.results_dir().display()
    ));
    if !missing.is_empty() {
        say(format!("missing ({}):", missing.len()));
        for m in &missing {
            say(format!("  {m}"));
        }
    }
    Ok(())
}

fn slurm(args: &SlurmArgs) -> Result<()> {
    let cfg = config::load(&args.config)?;
    let cells = grid::cells(&cfg)?;
    config::check_paths(&cfg)?;
    let owner =
        experiments::results::Owner::new("experiments", &cfg.experiment.name, &cfg.file, &cfg.text);
    let results =
        experiments::results::ResultsDir::open_shared(&cfg.experiment.results_dir(), &owner)?;
    let opts = experiments::slurm::SlurmOptions {
        partition: args.partition.clone(),
        gpus_per_task: args.gpus_per_task,
        cpus_per_task: args.cpus_per_task,
        mem: args.mem.clone(),
        time: args.time.clone(),
        max_running: args.max_running,
        extra: args.sbatch.clone(),
        lease_seconds: args.lease_seconds,
    };
    let exe = std::env::current_exe().context("the path of this binary")?;
    let workdir = std::env::current_dir().context("the current folder")?;
    let s = experiments::slurm::write(&cfg, &cells, &results, &opts, &exe, &workdir)?;
    say(format!(
        "{} of the grid's {} cells unfinished; scripts in {}",
        s.cells.len(),
        cells.len(),
        s.dir.display()
    ));
    if s.cells.is_empty() {
        say("every cell is finished: only the report job is left");
    }
    if args.submit {
        let jobs = experiments::slurm::submit(&s)?;
        if let Some(a) = &jobs.array_job {
            say(format!("submitted array job {a} ({} tasks)", s.cells.len()));
        }
        say(format!("submitted report job {}", jobs.report_job));
    } else {
        say(format!("submit with:\n{}", s.command));
    }
    Ok(())
}

fn run_bench(path: &std::path::Path) -> Result<()> {
    let started = std::time::Instant::now();
    let cfg = bench::config::load(path)?;
    let out = bench::run(&cfg)?;
    let md = out.dir.join("efficiency.md");
    let text = std::fs::read_to_string(&md)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", md.display()))?;
    say(text);
    for t in &out.report.targets {
        say(format!("target: {}", t.line()));
    }
    for s in &out.info.skipped {
        say(format!("not run: {} ({}): {}", s.model, s.schemes, s.reason));
    }
    say(format!(
        "results in {} ({:.0} s wall time)",
        out.dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Writes a line to stdout; a closed pipe (`experiments … | head`) ends the program quietly
/// instead of panicking.
fn say(text: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}
