//! `experiments`: the project's one binary. `experiments CONFIG.toml` runs a config's grid;
//! subcommands generate with a checkpoint, train the embedded tiny LLaVA, and so on.

use std::path::PathBuf;

use anyhow::Result;
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
    /// Print the resolved cells and their ids without running anything.
    #[arg(long)]
    dry_run: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a config's grid of cells.
    Run {
        config: PathBuf,
        #[arg(long)]
        dry_run: bool,
    },
    /// Answer a prompt about an image with a checkpoint directory.
    Generate(cli::GenerateArgs),
    /// Train the embedded tiny LLaVA on easy-VQA (configs/train-tiny.toml).
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
        .init();
    let args = Args::parse();
    match (args.command, args.config) {
        (Some(Command::Run { config, dry_run }), _) => run_config(&config, dry_run || args.dry_run),
        (Some(Command::Generate(g)), _) => {
            say(cli::generate(&g)?);
            Ok(())
        }
        (Some(Command::TrainTiny { config, force }), _) => {
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
        (None, Some(config)) => run_config(&config, args.dry_run),
        (None, None) => {
            anyhow::bail!("nothing to do: pass a config (e.g. `experiments configs/ablation.toml`) or a subcommand (--help)")
        }
    }
}

fn run_config(path: &std::path::Path, dry_run: bool) -> Result<()> {
    let cfg = config::load(path)?;
    let cells = grid::cells(&cfg)?;
    say(grid::plan_text(&cfg, &cells).trim_end());
    if dry_run {
        return Ok(());
    }
    config::check_paths(&cfg)?;
    experiments::run::run(&cfg, &cells)?;
    say(format!("results in {}", cfg.experiment.results_dir().display()));
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
