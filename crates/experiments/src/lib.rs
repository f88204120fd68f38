//! The experiments crate: configs, the grid runner, evaluations, tables and figures, and the
//! embedded tiny LLaVA. The `experiments` binary (main.rs) is a thin CLI over this library.
//!
//! Modules, bottom to top (each imports only from those above it in this list):
//! - [`progress`], [`lock`] (file locks, one machine or many) ← [`results`] (a run's results
//!   folder: layout, locks, atomic writes), [`memory`];
//! - [`settings`] (bit widths, activation and weight settings) ← [`methods`] (presets and
//!   `[[methods]]`) ← [`config`] (the experiment config) ← [`grid`] (cells and their ids);
//! - [`data`] (dataset files, read only) ← [`prompt`] (every benchmark's prompts) ← [`eval`]
//!   (generation and scoring per benchmark) ← [`calib`] (calibration pairs of every dataset);
//! - [`run`] (the grid runner) → [`table`] (tables from the cells' result files) → [`report`]
//!   (figures and `report.md` from the tables) with [`figure`] (plotters);
//! - [`slurm`] (a grid's unfinished cells as a Slurm job array, then a report job);
//! - [`bench`] (the efficiency benchmark), [`tiny`] (the embedded model's training), [`cli`].

pub mod bench;
pub mod calib;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod figure;
pub mod fingerprint;
pub mod grid;
pub mod lock;
pub mod memory;
pub mod methods;
pub mod progress;
pub mod prompt;
pub mod quantize;
pub mod report;
pub mod results;
pub mod run;
pub mod scaling;
pub mod settings;
pub mod slurm;
pub mod stats;
pub mod table;
pub mod tiny;
pub mod vlm;
