//! ScienceQA's prompts, as LLaVA's conversion scripts and `model_vqa_science` build them: the two
//! formats Q-VLM's tables use (QCM-LEPA, CQM-A), the question text, the training target (VEO's
//! calibration answers) and the user turn.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use qvlm_core::io::prompt::Template;
use serde::{Deserialize, Serialize};

use crate::data::scienceqa::{LlavaQuestion, Problem, ScienceQa, OPTIONS};

/// `--single-pred-prompt` of `model_vqa_science.py`
/// (<https://github.com/ChangyuanWang17/QVLM/blob/4faa7f77d6ca477a3dc169716362e7c6e1757793/llava/eval/model_vqa_science.py>:
/// `qs = qs + '\n' + "Answer with the option's letter from the given choices directly."`).
pub const SINGLE_PRED_PROMPT: &str =
    "Answer with the option's letter from the given choices directly.";

/// One question ready for the model: the user text without the image token, and its image.
#[derive(Clone, Debug, PartialEq)]
pub struct SqaItem {
    pub pid: String,
    /// `model_vqa_science`'s `qs` before the image token and the single-pred suffix.
    pub text: String,
    pub image: Option<PathBuf>,
}

/// The two formats of LLaVA's `convert_sqa_to_llava.py` that Q-VLM's tables use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PromptFormat {
    /// Question, context, options → lecture, solution, answer: Q-VLM's LLaVA-v1.3 ScienceQA setup
    /// (`llava_test_QCM-LEPA.json`, no single-pred prompt, long generations).
    #[serde(rename = "QCM-LEPA")]
    QcmLepa,
    /// Context, question, options → answer, with the single-pred prompt: LLaVA-1.5's `sqa.sh`
    /// (`llava_test_CQM-A.json`).
    #[serde(rename = "CQM-A")]
    CqmA,
}

impl PromptFormat {
    pub fn name(self) -> &'static str {
        match self {
            PromptFormat::QcmLepa => "QCM-LEPA",
            PromptFormat::CqmA => "CQM-A",
        }
    }

    /// Whether the protocol passes `--single-pred-prompt` (LLaVA-1.5's `scripts/v1_5/eval/sqa.sh`
    /// does; Q-VLM's `scripts/generate_sqa_response.sh` does not).
    pub fn single_pred(self) -> bool {
        matches!(self, PromptFormat::CqmA)
    }
}

impl std::str::FromStr for PromptFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "QCM-LEPA" => Ok(PromptFormat::QcmLepa),
            "CQM-A" => Ok(PromptFormat::CqmA),
            other => bail!("unknown ScienceQA prompt format `{other}` (QCM-LEPA, CQM-A)"),
        }
    }
}

// The prompt text follows LLaVA's `scripts/convert_sqa_to_llava_base_prompt.py` (the same file is
// in Q-VLM's repository) and `scripts/convert_sqa_to_llava.py`:
// https://github.com/haotian-liu/LLaVA/blob/5a5bda8f584637c2db9d780ded986f11f40dd06f/scripts/convert_sqa_to_llava_base_prompt.py
// https://github.com/haotian-liu/LLaVA/blob/82bc69e009402639336d110cb48c48772172e19c/scripts/convert_sqa_to_llava.py

/// `get_context_text(problem, use_caption=False)` (base_prompt L6-L12): the stripped hint, or "N/A".
pub fn context_text(problem: &Problem) -> String {
    let context = problem.hint.trim();
    if context.is_empty() {
        "N/A".to_string()
    } else {
        context.to_string()
    }
}

/// `get_choice_text` (base_prompt L15-L22): `"(A) first (B) second"`.
pub fn choice_text(problem: &Problem) -> String {
    let list: Vec<String> =
        problem.choices.iter().zip(OPTIONS).map(|(c, o)| format!("({o}) {c}")).collect();
    list.join(" ")
}

/// The human turn without the image marker: `create_one_example_chatbot`'s input (base_prompt
/// L46-L49, L97: `input.replace("  ", " ").strip()`), then `convert_to_llava`'s removal of
/// "Question: " (convert_sqa_to_llava L18-L19: every occurrence, when the input starts with it).
pub fn input_text(problem: &Problem, format: PromptFormat) -> String {
    let (question, context, choice) =
        (&problem.question, context_text(problem), choice_text(problem));
    let input = match format {
        PromptFormat::CqmA => {
            format!("Context: {context}\nQuestion: {question}\nOptions: {choice}\n")
        }
        PromptFormat::QcmLepa => {
            format!("Question: {question}\nContext: {context}\nOptions: {choice}\n")
        }
    };
    let input = input.replace("  ", " ").trim().to_string();
    if input.starts_with("Question: ") {
        input.replace("Question: ", "")
    } else {
        input
    }
}

/// The gpt turn (training target) of `create_one_example_chatbot` with `test_example=False`
/// (base_prompt L68-L69, L88-L95, L98; lecture and solution as `build_prompt_chatbot` passes them),
/// after `convert_to_llava`'s removal of "Answer: " (convert_sqa_to_llava L20-L21).
pub fn target_text(problem: &Problem, format: PromptFormat) -> String {
    let answer = problem.answer_letter();
    let output = match format {
        PromptFormat::CqmA => format!("Answer: The answer is {answer}."),
        PromptFormat::QcmLepa => {
            // get_lecture_text's "\n" → "\\n" undone by build_prompt_chatbot's "\\n" → "\n".
            let lecture = problem.lecture.replace("\\n", "\n");
            let solution = problem.solution.replace("\\n", "\n");
            let mut out = String::new();
            if !lecture.trim().is_empty() {
                out += &format!("LECTURE: {lecture}\n");
            }
            if !solution.trim().is_empty() {
                out += &format!("SOLUTION: {solution}\n");
            }
            out += "###\n";
            out += &format!("ANSWER: {answer}.");
            out
        }
    };
    let output = output.replace("  ", " ").trim().to_string();
    if output.starts_with("Answer: ") {
        output.replace("Answer: ", "")
    } else {
        output
    }
}

/// The human value of LLaVA's converted file (convert_sqa_to_llava L24-L41): the input, with
/// `"\n<image>"` appended when the problem has an image.
pub fn human_value(problem: &Problem, format: PromptFormat) -> String {
    let input = input_text(problem, format);
    if problem.image.is_some() {
        format!("{input}\n<image>")
    } else {
        input
    }
}

/// `model_vqa_science`'s `qs = question['value'].replace('<image>', '').strip()`.
pub fn question_text(human_value: &str) -> String {
    human_value.replace("<image>", "").trim().to_string()
}

/// `model_vqa_science`'s user turn: the image token in front (`"<image>\n" + qs`, or wrapped in
/// `<im_start>`/`<im_end>`), then `"\n" + SINGLE_PRED_PROMPT` when `single_pred`.
pub fn user_message(item: &SqaItem, single_pred: bool, use_im_start_end: bool) -> String {
    let mut message = if item.image.is_some() {
        Template::image_question(&item.text, use_im_start_end)
    } else {
        item.text.clone()
    };
    if single_pred {
        message.push('\n');
        message.push_str(SINGLE_PRED_PROMPT);
    }
    message
}

/// The questions of `data`'s split built from `problems.json` in `format`.
pub fn items(data: &ScienceQa, format: PromptFormat) -> Vec<SqaItem> {
    data.problems
        .iter()
        .map(|p| SqaItem {
            pid: p.pid.clone(),
            text: question_text(&human_value(p, format)),
            image: data.image_path(p),
        })
        .collect()
}

/// The questions of a LLaVA converted file, joined onto `data`'s split: every id must be one of its
/// pids and every image must exist below `image_folder` (LLaVA's `--image-folder`).
pub fn items_from_llava(
    data: &ScienceQa,
    file: &Path,
    questions: &[LlavaQuestion],
    image_folder: &Path,
) -> Result<Vec<SqaItem>> {
    questions
        .iter()
        .map(|q| {
            if data.problem(&q.id).is_none() {
                bail!(
                    "{}: id {} is not in the `{}` split of {}",
                    file.display(),
                    q.id,
                    data.split.name(),
                    data.root.join("pid_splits.json").display()
                );
            }
            let image = match &q.image {
                Some(rel) => {
                    let path = image_folder.join(rel);
                    if !path.is_file() {
                        bail!(
                            "{}: id {} names image `{rel}`, but {} does not exist",
                            file.display(),
                            q.id,
                            path.display()
                        );
                    }
                    Some(path)
                }
                None => None,
            };
            Ok(SqaItem { pid: q.id.clone(), text: question_text(&q.human), image })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;
    use crate::data::scienceqa::tests::{
        magnet_problem, raw, temp_dir, text_problem, write_dataset,
    };
    use crate::data::scienceqa::{load_llava_questions, ImageLayout, Split};

    #[test]
    fn qcm_lepa_strings_match_llava_conversion() {
        let p = magnet_problem();
        let input = "Will these magnets attract or repel each other?\n\
                     Context: Two magnets are placed as shown.\n\
                     Options: (A) repel (B) attract";
        assert_eq!(input_text(&p, PromptFormat::QcmLepa), input);
        assert_eq!(human_value(&p, PromptFormat::QcmLepa), format!("{input}\n<image>"));
        assert_eq!(
            target_text(&p, PromptFormat::QcmLepa),
            "LECTURE: Magnets can pull or push.\nOpposite poles attract.\n\
             SOLUTION: The S pole faces the N pole.\n###\nANSWER: B."
        );
        let item = SqaItem {
            pid: p.pid.clone(),
            text: question_text(&human_value(&p, PromptFormat::QcmLepa)),
            image: Some(PathBuf::from("x.png")),
        };
        assert_eq!(user_message(&item, false, false), format!("<image>\n{input}"));
        assert_eq!(user_message(&item, false, true), format!("<im_start><image><im_end>\n{input}"));
        // Without lecture and solution the target is just the answer block.
        let t = text_problem();
        assert_eq!(target_text(&t, PromptFormat::QcmLepa), "###\nANSWER: A.");
        assert_eq!(
            input_text(&t, PromptFormat::QcmLepa),
            "Which word would you find on a dictionary page?\nContext: N/A\n\
             Options: (A) ship (B) gave (C) zoo"
        );
    }

    #[test]
    fn cqm_a_strings_match_llava_1_5() {
        let p = magnet_problem();
        let input = "Context: Two magnets are placed as shown.\n\
                     Question: Will these magnets attract or repel each other?\n\
                     Options: (A) repel (B) attract";
        assert_eq!(input_text(&p, PromptFormat::CqmA), input);
        assert_eq!(target_text(&p, PromptFormat::CqmA), "The answer is B.");
        let item = SqaItem {
            pid: p.pid.clone(),
            text: question_text(&human_value(&p, PromptFormat::CqmA)),
            image: Some(PathBuf::from("x.png")),
        };
        assert_eq!(
            user_message(&item, true, false),
            format!(
                "<image>\n{input}\nAnswer with the option's letter from the given choices directly."
            )
        );
        let t = text_problem();
        let item = SqaItem {
            pid: t.pid.clone(),
            text: question_text(&human_value(&t, PromptFormat::CqmA)),
            image: None,
        };
        assert_eq!(
            user_message(&item, PromptFormat::CqmA.single_pred(), false),
            "Context: N/A\nQuestion: Which word would you find on a dictionary page?\n\
             Options: (A) ship (B) gave (C) zoo\n\
             Answer with the option's letter from the given choices directly."
        );
    }

    #[test]
    fn conversion_quirks_are_kept() {
        // Double spaces collapse once (Python's str.replace), and every "Question: " goes.
        let mut p = text_problem();
        p.question = "Pick one:   Question: which?".into();
        assert_eq!(
            input_text(&p, PromptFormat::QcmLepa),
            "Pick one:  which?\nContext: N/A\nOptions: (A) ship (B) gave (C) zoo"
        );
        // CQM input does not start with "Question: ", so nothing is removed.
        assert!(
            input_text(&p, PromptFormat::CqmA).contains("Question: Pick one:  Question: which?")
        );
        // A literal backslash-n in the lecture becomes a newline.
        p.lecture = "a\\nb".into();
        assert_eq!(target_text(&p, PromptFormat::QcmLepa), "LECTURE: a\nb\n###\nANSWER: A.");
        assert_eq!("CQM-A".parse::<PromptFormat>().ok(), Some(PromptFormat::CqmA));
        assert!("QCM-A".parse::<PromptFormat>().is_err());
    }

    #[test]
    fn items_carry_the_question_text_and_image() {
        let dir = temp_dir("sqa-items");
        let (a, b) = (magnet_problem(), text_problem());
        write_dataset(&dir, &[raw(&a), raw(&b)], &["42", "7"]);
        let data = ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect("load");
        let got = items(&data, PromptFormat::QcmLepa);
        assert_eq!(got[0].image, Some(dir.join("images/test/42/image.png")));
        assert_eq!(got[0].text, input_text(&a, PromptFormat::QcmLepa));
        assert_eq!(got[1].image, None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn llava_converted_files_give_the_same_items() {
        let dir = temp_dir("sqa-llava");
        let (a, b) = (magnet_problem(), text_problem());
        write_dataset(&dir, &[raw(&a), raw(&b)], &["42", "7"]);
        let data = ScienceQa::load(&dir, Split::Test, ImageLayout::official(&dir)).expect("load");
        for format in [PromptFormat::QcmLepa, PromptFormat::CqmA] {
            // What convert_sqa_to_llava.py writes for these problems.
            let converted = json!([
                {"id": "42", "image": "42/image.png", "conversations": [
                    {"from": "human", "value": human_value(&a, format)},
                    {"from": "gpt", "value": target_text(&a, format)}]},
                {"id": "7", "conversations": [
                    {"from": "human", "value": human_value(&b, format)},
                    {"from": "gpt", "value": target_text(&b, format)}]},
            ]);
            let file = dir.join(format!("llava_test_{}.json", format.name()));
            std::fs::write(&file, converted.to_string()).expect("write");
            let questions = load_llava_questions(&file).expect("load");
            assert_eq!(questions[1].gpt.as_deref(), Some(target_text(&b, format).as_str()));
            let got = items_from_llava(&data, &file, &questions, &dir.join("images").join("test"))
                .expect("join");
            assert_eq!(got, items(&data, format));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
