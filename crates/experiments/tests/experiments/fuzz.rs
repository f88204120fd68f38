//! Fuzzing the input parsers (proptest): the shipped configs and small dataset files, mutated at
//! random (lines dropped, duplicated or cut, values replaced by hostile ones, keys added, bytes
//! flipped), must parse or be refused with an error naming the file — never panic. `make test`
//! runs a bounded number of cases per target (64, or `PROPTEST_CASES`); for a longer run:
//!
//! ```sh
//! PROPTEST_CASES=20000 cargo test -p experiments --test experiments_tests fuzz
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// Every shipped config's text.
fn shipped() -> &'static [(String, String)] {
    static CONFIGS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let mut out = Vec::new();
        for dir in [root().join("configs"), root().join("configs/real")] {
            for e in std::fs::read_dir(dir).expect("configs").flatten() {
                let p = e.path();
                if p.extension().and_then(|x| x.to_str()) == Some("toml") {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
                    out.push((name, std::fs::read_to_string(&p).expect("read")));
                }
            }
        }
        out.sort();
        out
    })
}

/// Values a careless user (or a corrupted file) puts where a value belongs.
const HOSTILE: &[&str] = &[
    "0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "\"\"",
    "\"..\"",
    "\"/\"",
    "\"W9A4\"",
    "\"W0A0\"",
    "[]",
    "{}",
    "[[]]",
    "true",
    "0.0",
    "1e-400",
    "\"per_token\"",
    "{ kind = \"nope\" }",
    "{ kind = \"per_group\", size = -3 }",
    "{ kind = \"quantile\", value = nan }",
    "1.5",
];

/// One edit of a TOML text, chosen by the numbers of a case.
#[derive(Debug, Clone)]
enum Edit {
    DropLine(usize),
    DuplicateLine(usize),
    ReplaceValue(usize, usize),
    AddKey(usize, usize),
    Truncate(usize),
    FlipByte(usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::DropLine),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(l, v)| Edit::ReplaceValue(l, v)),
        (any::<usize>(), any::<usize>()).prop_map(|(l, v)| Edit::AddKey(l, v)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::FlipByte(i, b)),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let n = lines.len().max(1);
    match *e {
        Edit::DropLine(l) => {
            if !lines.is_empty() {
                lines.remove(l % n);
            }
        }
        Edit::DuplicateLine(l) => {
            if let Some(line) = lines.get(l % n).cloned() {
                lines.insert(l % n, line);
            }
        }
        Edit::ReplaceValue(l, v) => {
            if let Some(line) = lines.get_mut(l % n) {
                if let Some((key, _)) = line.split_once('=') {
                    *line = format!("{key}= {}", HOSTILE[v % HOSTILE.len()]);
                }
            }
        }
        Edit::AddKey(l, v) => {
            lines.insert(l % n, format!("fuzzed_key = {}", HOSTILE[v % HOSTILE.len()]));
        }
        Edit::Truncate(at) => {
            let joined = lines.join("\n");
            let mut cut = at % (joined.len() + 1);
            while !joined.is_char_boundary(cut) {
                cut -= 1;
            }
            return joined[..cut].to_string();
        }
        Edit::FlipByte(i, b) => {
            let mut bytes = lines.join("\n").into_bytes();
            if !bytes.is_empty() {
                let at = i % bytes.len();
                bytes[at] = b;
            }
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    lines.join("\n")
}

/// Parses `text` as every command's config: whatever happens, no panic, and errors name the file.
fn parse_everything(text: &str) {
    let path = Path::new("fuzzed.toml");
    let named = |e: anyhow::Error| {
        let msg = format!("{e:#}");
        assert!(msg.starts_with("fuzzed.toml"), "error without the file: {msg}");
    };
    match experiments::config::parse(text, path) {
        Ok(cfg) => {
            let cells = experiments::grid::cells(&cfg).expect("a valid config resolves");
            for c in &cells {
                if let experiments::grid::CellKind::Quantized { bits, method } = &c.kind {
                    let _ = method.scheme(*bits, &c.quant);
                }
            }
        }
        Err(e) => named(e),
    }
    match experiments::bench::config::parse(text, path) {
        Ok(cfg) => {
            for shape in cfg.shapes().expect("validated shapes resolve") {
                let _ = shape.dims.parameters(shape.dims.text_layers);
            }
        }
        Err(e) => named(e),
    }
    if let Err(e) = experiments::tiny::train::parse_config(text, path) {
        named(e);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_configs_parse_or_are_refused_naming_the_file(
        which in any::<usize>(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let configs = shipped();
        let (_, text) = &configs[which % configs.len()];
        let mut text = text.clone();
        for e in &edits {
            text = apply(&text, e);
        }
        parse_everything(&text);
    }

    #[test]
    fn fuzz_dataset_files_load_or_are_refused_naming_the_file(
        kind in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
    ) {
        let dir = std::env::temp_dir().join(format!("qvlm-fuzz-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // A valid file of each kind, then corrupted bytes and a random cut.
        let (name, valid) = match kind {
            0 => ("questions.json", r#"[["is there a circle?", "yes", 0], ["what color is the shape?", "red", 1]]"#.to_string()),
            1 => ("problems.json", serde_json::json!({"1": {"question": "q?", "choices": ["a", "b"], "answer": 1, "hint": "", "image": null, "subject": "natural science", "grade": "grade2", "lecture": "", "solution": "", "split": "test"}}).to_string()),
            2 => ("q.jsonl", "{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"what?\"}\n{\"question_id\": 2, \"image\": \"a.png\", \"text\": \"why?\"}\n".to_string()),
            _ => ("a.jsonl", "{\"question_id\": 1, \"answers\": [\"yes\", \"no\"]}\n{\"question_id\": 2, \"answers\": [{\"answer\": \"red\"}]}\n".to_string()),
        };
        let mut bytes = valid.into_bytes();
        for (at, b) in &edits {
            let len = bytes.len();
            if len > 0 {
                bytes[at % len] = *b;
            }
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let file = dir.join(name);
        std::fs::write(&file, &bytes).expect("write");
        let shown = file.display().to_string();
        let named = |e: anyhow::Error| {
            let msg = format!("{e:#}");
            assert!(msg.contains(&shown) || msg.contains(name), "error without the file: {msg}");
        };
        match kind {
            0 => {
                std::fs::create_dir_all(dir.join("test/images")).expect("dir");
                std::fs::rename(&file, dir.join("test/questions.json")).expect("move");
                let r = experiments::data::easy_vqa::EasyVqa::load(&dir, experiments::data::easy_vqa::Split::Test);
                if let Err(e) = r { named(e) }
            }
            1 => {
                std::fs::write(dir.join("pid_splits.json"), r#"{"test": ["1"]}"#).expect("splits");
                let layout = experiments::data::scienceqa::ImageLayout::official(&dir);
                let r = experiments::data::scienceqa::ScienceQa::load(&dir, experiments::data::scienceqa::Split::Test, layout);
                if let Err(e) = r { named(e) }
            }
            2 => {
                std::fs::write(dir.join("a.png"), b"png").expect("image");
                if let Err(e) = experiments::data::vqa::load_questions(&file) { named(e) }
            }
            _ => {
                if let Err(e) = experiments::data::vqa::load_answers(&file) { named(e) }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
