//! The experiments crate: configs, the grid runner, evaluations, tables and figures, and the
//! embedded tiny LLaVA. The `experiments` binary (main.rs) is a thin CLI over this library.

pub mod bench;
pub mod calib;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod figure;
pub mod memory;
pub mod methods;
pub mod report;
pub mod run;
pub mod table;
pub mod tiny;
