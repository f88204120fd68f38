//! `experiments generate --model DIR` on a Qwen2-VL and a Qwen2.5-VL checkpoint: the tiny random
//! checkpoints of the core parity fixtures (python/gen_qwen2vl_fixtures.py,
//! python/gen_qwen2_5_vl_fixtures.py), answered as transformers answers them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/qwen2vl/tiny")
}

fn generate(model: &Path, extra: &[&str]) -> Output {
    let image = fixture().join("image_1.png");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().expect("utf8"),
        "--image",
        image.to_str().expect("utf8"),
        "--prompt",
        "What color is the shape?",
        "--max-new-tokens",
        "8",
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run experiments")
}

#[test]
fn generate_answers_a_qwen2_vl_and_a_qwen2_5_vl_chat_like_transformers() {
    let qwen25 = fixture().join("../../qwen2_5_vl/tiny");
    for dir in [fixture(), qwen25] {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
        )
        .expect("json");
        let out = generate(&dir, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "generate failed on {}:\n{stderr}", dir.display());
        let answer = String::from_utf8_lossy(&out.stdout);
        let want = meta["chat_answer"].as_str().expect("answer");
        assert_eq!(answer.trim_end_matches('\n'), want, "{}", dir.display());
    }
}

#[test]
fn llava_flags_on_a_qwen2_vl_checkpoint_are_errors() {
    let out = generate(&fixture(), &["--template", "vicuna_v1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("own chat template"), "{stderr}");
    // Another Qwen VLM is refused by name, not loaded as LLaVA.
    let dir = std::env::temp_dir().join(format!("qvlm-qwen25-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen3_vl", "vision_config": {}}"#)
        .expect("write");
    let out = generate(&dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("qwen3_vl") && stderr.contains("model_type"), "{stderr}");
}
