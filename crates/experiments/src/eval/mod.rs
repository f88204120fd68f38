pub mod dataset;
pub mod easy_vqa;
pub mod scienceqa;
pub mod vqa;
