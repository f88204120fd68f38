//! Evaluation: batched greedy generation ([`generate`]) shared by every benchmark, scoring per
//! benchmark ([`easy_vqa`], [`scienceqa`], [`vqa`] with [`evalai`]'s normalization), and the
//! evaluated dataset of a run ([`dataset`]).

pub mod dataset;
pub mod easy_vqa;
pub mod evalai;
pub mod generate;
pub mod scienceqa;
pub mod vqa;
