//! Dataset files, read and validated (errors name the file and the entry); nothing here builds
//! prompts or scores answers.

pub mod easy_vqa;
pub mod scienceqa;
pub mod vqa;
