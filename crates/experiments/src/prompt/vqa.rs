//! VQA-style prompts as LLaVA-1.5's `model_vqa_loader` builds them (VQAv2, VizWiz).

use qvlm_core::io::prompt::Template;

use crate::data::vqa::VqaQuestion;

/// LLaVA-1.5's short-answer prompt (docs/Evaluation.md; the VQAv2/VizWiz question files end with
/// `"\nAnswer the question using a single word or phrase."`).
pub const SHORT_ANSWER_PROMPT: &str = "Answer the question using a single word or phrase.";

/// The question text sent to the model: `text` as the file has it, with `"\n" +`
/// [`SHORT_ANSWER_PROMPT`] appended when `short_answer` is set and the text does not end with it
/// already (LLaVA's files do; `model_vqa_loader` then uses `text` verbatim).
pub fn prompt_text(text: &str, short_answer: bool) -> String {
    if short_answer && !text.trim_end().ends_with(SHORT_ANSWER_PROMPT) {
        format!("{text}\n{SHORT_ANSWER_PROMPT}")
    } else {
        text.to_string()
    }
}

/// The user turn of `model_vqa_loader`: `"<image>\n" + text` (wrapped in `<im_start>`/`<im_end>`
/// when the model uses them)
/// (<https://github.com/haotian-liu/LLaVA/blob/10462fee8afae4fdea9330e450af0bab1e0c9a44/llava/eval/model_vqa_loader.py>).
pub fn user_message(question: &VqaQuestion, short_answer: bool, use_im_start_end: bool) -> String {
    Template::image_question(&prompt_text(&question.text, short_answer), use_im_start_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::vqa::QuestionId;

    #[test]
    fn prompt_suffix_is_added_once() {
        assert_eq!(
            prompt_text("What color is the bus?", true),
            "What color is the bus?\nAnswer the question using a single word or phrase."
        );
        let llava = "What color is the bus?\nAnswer the question using a single word or phrase.";
        assert_eq!(prompt_text(llava, true), llava);
        assert_eq!(prompt_text("What?", false), "What?");
    }

    #[test]
    fn loader_prompt_puts_the_image_first() {
        let q = VqaQuestion {
            line: 1,
            question_id: QuestionId::Int(7),
            image: "a.jpg".into(),
            text: "What color is the bus?".into(),
        };
        let msg = user_message(&q, true, false);
        assert_eq!(
            msg,
            "<image>\nWhat color is the bus?\nAnswer the question using a single word or phrase."
        );
        assert_eq!(
            Template::VicunaV1.render(&msg),
            "A chat between a curious user and an artificial intelligence assistant. The assistant \
             gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n\
             What color is the bus?\nAnswer the question using a single word or phrase. ASSISTANT:"
        );
    }
}
