//! A checkpoint with a missing, extra or wrongly shaped tensor (and other broken inputs) fails
//! with an error naming the tensor, key or file.

use std::collections::BTreeMap;
use std::path::Path;

use qvlm_core::io::safetensors::{write_safetensors, SafetensorsFile};
use qvlm_core::model::llava::{LlavaBundle, LoadOptions};
use tch::{Kind, Tensor};

use super::common::{copy_dir, llava_fixtures, TempDir};

/// A copy of the `hf_mha_mlp` fixture whose `model.safetensors` is rewritten by `edit`.
fn broken_copy(tag: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> TempDir {
    let tmp = TempDir::new(tag);
    copy_dir(&llava_fixtures().join("hf_mha_mlp"), &tmp.0);
    let file = tmp.0.join("model.safetensors");
    let st = SafetensorsFile::open(&file).expect("open");
    let mut tensors: BTreeMap<String, Tensor> =
        st.names().map(|n| (n.to_string(), st.read(n).expect("read"))).collect();
    edit(&mut tensors);
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_safetensors(&file, &list, &BTreeMap::new()).expect("write");
    tmp
}

fn load_err(dir: &Path) -> String {
    match LlavaBundle::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

const UP: &str = "language_model.model.layers.1.mlp.up_proj.weight";

#[test]
fn missing_tensor_is_named() {
    let tmp = broken_copy("missing", |t| {
        t.remove(UP);
    });
    let err = load_err(&tmp.0);
    assert!(
        err.contains(UP) && err.contains("missing") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn unused_tensor_is_named() {
    let extra = "language_model.model.layers.0.mlp.extra_proj.weight";
    let tmp = broken_copy("unused", |t| {
        t.insert(extra.to_string(), Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu)));
    });
    let err = load_err(&tmp.0);
    assert!(err.contains(extra) && err.contains("not used"), "{err}");
}

#[test]
fn wrongly_shaped_tensor_is_named_even_when_it_would_broadcast() {
    let norm = "language_model.model.layers.0.input_layernorm.weight";
    let tmp = broken_copy("shape", |t| {
        t.insert(norm.to_string(), Tensor::ones([1], (Kind::Float, tch::Device::Cpu)));
    });
    let err = load_err(&tmp.0);
    assert!(err.contains(norm) && err.contains("[1]") && err.contains("[32]"), "{err}");
}

#[test]
fn truncated_and_garbage_safetensors_name_the_file() {
    let tmp = broken_copy("trunc", |_| {});
    let file = tmp.0.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("write");
    let err = load_err(&tmp.0);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    std::fs::write(&file, b"definitely not a safetensors file").expect("write");
    let err = load_err(&tmp.0);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn sharded_index_naming_a_missing_shard_is_reported() {
    let tmp = TempDir::new("shard");
    copy_dir(&llava_fixtures().join("hf_prefixed_sharded"), &tmp.0);
    std::fs::remove_file(tmp.0.join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_err(&tmp.0);
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("weight_map"),
        "{err}"
    );
}

#[test]
fn invalid_config_json_names_the_key() {
    let tmp = broken_copy("config", |_| {});
    let path = tmp.0.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    let mut cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
    cfg["text_config"]["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(&path, cfg.to_string()).expect("write");
    let err = load_err(&tmp.0);
    assert!(
        err.contains("text_config.num_key_value_heads") && err.contains("config.json"),
        "{err}"
    );
    std::fs::write(&path, "{ not json").expect("write");
    let err = load_err(&tmp.0);
    assert!(err.contains("config.json") && err.contains("JSON"), "{err}");
    std::fs::remove_file(&path).expect("rm");
    let err = load_err(&tmp.0);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn missing_or_corrupt_tokenizer_is_reported() {
    let tmp = broken_copy("tok", |_| {});
    let path = tmp.0.join("tokenizer.json");
    std::fs::write(&path, "{\"model\": 3}").expect("write");
    let err = load_err(&tmp.0);
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_file(&path).expect("rm");
    let err = load_err(&tmp.0);
    assert!(err.contains("tokenizer.json") && err.contains("not found"), "{err}");
}
