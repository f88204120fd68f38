//! Every benchmark's prompts, in one place: the user turn and the whole prompt of a question as the
//! reference scripts build them. `data` reads the files; `eval` and `calib` ask here how a
//! question is put to the model.

pub mod easy_vqa;
pub mod scienceqa;
pub mod vqa;
