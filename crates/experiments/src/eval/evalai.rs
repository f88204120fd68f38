//! EvalAI's answer normalization and the VQA accuracy (how VQAv2 and VizWiz are scored).

// EvalAI's answer processing, as LLaVA's `llava/eval/m4c_evaluator.py` (`EvalAIAnswerProcessor`,
// copied from https://github.com/facebookresearch/mmf/blob/c46b3b3391275b4181567db80943473a89ab98ab/pythia/tasks/processors.py#L897,
// itself from the official VQA eval
// https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/vqaEval.py)
// applies it before `scripts/convert_vqav2_for_submission.py` / `convert_vizwiz_for_submission.py`
// upload; read from LLaVA's copy at
// https://github.com/pixas/LLaVA/blob/fbd51158da0dd4528a900727050a0fdae28052f4/llava/eval/m4c_evaluator.py
// (identical to haotian-liu/LLaVA's).

const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

const NUMBER_MAP: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

const PUNCTUATIONS: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `re.sub`'s third positional argument is `count`: upstream passes `re.UNICODE` (= 32) there, so
/// at most 32 periods are stripped.
const PERIOD_STRIP_COUNT: usize = 32;

/// `COMMA_STRIP = (?<=\d)(\,)+(?=\d)`: a run of commas between two digits.
fn has_comma_between_digits(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == ',' && i > 0 && chars[i - 1].is_ascii_digit() {
            let run = chars[i..].iter().take_while(|&&c| c == ',').count();
            if chars.get(i + run).is_some_and(char::is_ascii_digit) {
                return true;
            }
            i += run;
        } else {
            i += 1;
        }
    }
    false
}

/// `process_punctuation`: each mark is deleted when it touches a space in the input (or the input
/// has a digit,digit comma), else replaced by a space; then `PERIOD_STRIP = (?!<=\d)(\.)(?!\d)` —
/// upstream's typo makes the first group a lookahead that always holds, so it deletes every period
/// not followed by a digit (at most 32).
pub fn process_punctuation(text: &str) -> String {
    let comma = has_comma_between_digits(text);
    let mut out = text.to_string();
    for p in PUNCTUATIONS {
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        let with = if touches_space || comma { "" } else { " " };
        out = out.replace(p, with);
    }
    let chars: Vec<char> = out.chars().collect();
    let mut stripped = String::with_capacity(out.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let next_is_digit = chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c == '.' && !next_is_digit && removed < PERIOD_STRIP_COUNT {
            removed += 1;
        } else {
            stripped.push(c);
        }
    }
    stripped
}

/// `process_digit_article`: lower-case, split on whitespace, number words → digits, articles
/// dropped, contractions restored, joined by single spaces.
pub fn process_digit_article(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split_whitespace()
        .map(|w| NUMBER_MAP.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| *v))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| CONTRACTIONS.iter().find(|(k, _)| *k == w).map_or(w, |(_, v)| *v))
        .collect();
    words.join(" ")
}

/// `EvalAIAnswerProcessor.__call__`: `word_tokenize` (lower-case; drop `,` and `?`; `'s` → ` 's`),
/// newlines and tabs to spaces, then [`process_punctuation`] and [`process_digit_article`].
/// Digits are ASCII here (Python's `\d` also matches other Unicode decimal digits).
pub fn normalize_answer(answer: &str) -> String {
    let word = answer.to_lowercase().replace([',', '?'], "").replace("'s", " 's");
    let item = word.trim().replace(['\n', '\t'], " ");
    let item = process_punctuation(item.trim());
    process_digit_article(&item)
}

/// The VQA accuracy of one prediction, in [0, 1]: prediction and human answers normalized with
/// [`normalize_answer`], then `min(1, #matching others / 3)` averaged over the leave-one-out subsets
/// of the human answers — for VQAv2/VizWiz's 10 answers, the 10-choose-9 average of EvalAI's
/// `vqaEval.py` and LLaVA's `TextVQAAccuracyEvaluator._compute_answer_scores`. With a single human
/// answer there is no leave-one-out subset: the score is exact match (1 or 0); with none it is 0.
///
/// EvalAI's server skips normalization when all answers agree; since it receives predictions
/// already normalized by LLaVA's submission scripts, the two differ only for unnormalized
/// annotations.
pub fn vqa_accuracy(prediction: &str, answers: &[String]) -> f64 {
    let pred = normalize_answer(prediction);
    let gts: Vec<String> = answers.iter().map(|a| normalize_answer(a)).collect();
    match gts.len() {
        0 => 0.0,
        1 => f64::from(u8::from(gts[0] == pred)),
        n => {
            let matching = gts.iter().filter(|g| **g == pred).count();
            let total: f64 = gts
                .iter()
                .map(|g| {
                    let others = matching - usize::from(*g == pred);
                    (others as f64 / 3.0).min(1.0)
                })
                .sum();
            total / n as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn normalization_follows_evalai() {
        let cases = [
            ("Yes", "yes"),
            ("yes.", "yes"),
            ("Two", "2"),
            ("none", "0"),
            ("The dog", "dog"),
            ("a red apple", "red apple"),
            ("an", ""),
            ("dont", "don't"),
            ("isnt it?", "isn't it"),
            ("Dog's bowl", "dog 's bowl"),
            ("1,000", "1000"),
            ("2.5", "2.5"),
            ("t-shirt", "t shirt"),
            ("black - white", "black white"),
            ("yes!", "yes"),
            ("red/white", "red white"),
            ("(left)", "left"),
            ("  multiple   spaces\tand\ttabs \n", "multiple spaces and tabs"),
            ("The poster shows a 10% discount.", "poster shows 10% discount"),
            ("Im here", "im here"),
            ("somebody'd", "somebodyd"),
            ("youve", "you've"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_answer(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn punctuation_rules_keep_upstream_quirks() {
        // A mark next to a space is deleted everywhere, otherwise replaced by a space.
        assert_eq!(process_punctuation("a -b c-d"), "a b cd");
        assert_eq!(process_punctuation("c-d"), "c d");
        // A digit,digit comma anywhere deletes every mark.
        assert_eq!(process_punctuation("1,2 c-d"), "12 cd");
        assert!(has_comma_between_digits("9,,,9") && !has_comma_between_digits("9, 9"));
        // Periods before a digit stay; at most 32 are stripped.
        assert_eq!(process_punctuation("..5"), ".5");
        let many = ".".repeat(40);
        assert_eq!(process_punctuation(&many), ".".repeat(8));
        assert_eq!(CONTRACTIONS.len(), 120);
    }

    #[test]
    fn vqa_accuracy_is_the_leave_one_out_average() {
        let ten = |k: usize, other: &str| {
            let mut v = vec!["2".to_string(); k];
            v.resize(10, other.to_string());
            v
        };
        // ≥4 matches: every subset has ≥3 → 1.
        assert_eq!(vqa_accuracy("two", &ten(4, "3")), 1.0);
        // 3 matches: 7 subsets keep 3 (1.0), 3 subsets keep 2 (2/3) → 0.9.
        assert!((vqa_accuracy("2", &ten(3, "3")) - 0.9).abs() < 1e-12);
        // 2 matches: 8 subsets × 2/3 + 2 × 1/3 → 0.6.
        assert!((vqa_accuracy("2", &ten(2, "3")) - 0.6).abs() < 1e-12);
        // 1 match: 9 × 1/3 / 10 → 0.3.
        assert!((vqa_accuracy("2", &ten(1, "3")) - 0.3).abs() < 1e-12);
        assert_eq!(vqa_accuracy("4", &ten(1, "3")), 0.0);
        // Normalization applies to both sides.
        assert_eq!(vqa_accuracy("The Dog.", &s(&["dog", "dog", "a dog", "Dog"])), 1.0);
        // One answer: exact match; none: 0.
        assert_eq!(vqa_accuracy("Yes", &s(&["yes"])), 1.0);
        assert_eq!(vqa_accuracy("no", &s(&["yes"])), 0.0);
        assert_eq!(vqa_accuracy("no", &[]), 0.0);
    }
}
