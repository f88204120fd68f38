//! easy-VQA's prompt: LLaVA's `<image>\n{question}` in a conversation template.

use qvlm_core::io::prompt::Template;

/// The user turn of an easy-VQA question.
pub fn user_message(question: &str) -> String {
    Template::image_question(question, false)
}

/// The whole prompt of an easy-VQA question under `template`.
pub fn prompt(template: Template, question: &str) -> String {
    template.render(&user_message(question))
}
