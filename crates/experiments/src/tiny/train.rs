//! `experiments train-tiny CONFIG`: trains the tiny LLaVA on easy-VQA in two stages and saves it
//! as a llava-hf directory with its tokenizer and a training record.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use qvlm_core::checkpoint::llava_hf::save_llava_hf;
use qvlm_core::hook::NoHook;
use qvlm_core::io::config::{
    Activation, CheckpointFormat, ClipVisionConfig, LlamaConfig, LlavaConfig, ProjectorKind,
    RopeScaling, SelectFeature,
};
use qvlm_core::io::image::{ImageProcessor, ImageProcessorConfig};
use qvlm_core::io::prompt::{ImageSplice, Piece, PromptTokenizer, Template, IMAGE_PLACEHOLDER};
use qvlm_core::io::weights::VarBuilder;
use qvlm_core::model::llava::{Llava, LlavaBundle, LoadOptions};
use qvlm_core::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

use super::recipe::{begin, image_labels, lr_at, optimize, Begun, LabelHeads, TrainRecord};
use super::{tokenizer, TinyArch, TinyFamily, TrainTinyConfig};
use crate::data::easy_vqa::{EasyVqa, Question};
use crate::eval::easy_vqa::evaluate;
use crate::progress;
use crate::prompt::easy_vqa::prompt;
use qvlm_core::rng::SplitMix64;

/// The template every easy-VQA prompt of the tiny model goes through.
pub const TEMPLATE: Template = Template::LlavaV1;

pub fn llava_config(arch: &TinyArch, vocab: i64, image_token: i64) -> LlavaConfig {
    LlavaConfig {
        format: CheckpointFormat::LlavaHf,
        vision: ClipVisionConfig {
            hidden_size: arch.vision_hidden,
            intermediate_size: arch.vision_intermediate,
            num_hidden_layers: arch.vision_layers,
            num_attention_heads: arch.vision_heads,
            num_channels: 3,
            image_size: 64,
            patch_size: arch.patch_size,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        },
        text: LlamaConfig {
            vocab_size: vocab,
            hidden_size: arch.text_hidden,
            intermediate_size: arch.text_intermediate,
            num_hidden_layers: arch.text_layers,
            num_attention_heads: arch.text_heads,
            num_key_value_heads: arch.text_kv_heads,
            head_dim: arch.text_hidden / arch.text_heads,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            attention_bias: false,
            qkv_bias: false,
            mrope_section: None,
            mlp_bias: false,
            bos_token_id: Some(i64::from(tokenizer::BOS)),
            eos_token_ids: vec![i64::from(tokenizer::EOS)],
            pad_token_id: Some(i64::from(tokenizer::PAD)),
        },
        projector: ProjectorKind::Mlp2xGelu,
        projector_act: Activation::Gelu,
        projector_bias: true,
        image_token_id: Some(image_token),
        vision_feature_layer: -2,
        select_feature: SelectFeature::Default,
        use_im_start_end: false,
        clip_source: None,
    }
}

/// All images of a split, preprocessed: `[N, 3, 64, 64]` and id → row.
pub(super) fn load_pixels(
    data: &EasyVqa,
    proc: &ImageProcessor,
) -> Result<(Tensor, BTreeMap<u32, i64>)> {
    let ids = data.image_ids();
    let pb = progress::bar(ids.len() as u64, &format!("images {}", data.split.name()));
    let mut rows = Vec::with_capacity(ids.len());
    let mut index = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let path = data.image_path(*id).context("image without a path")?;
        rows.push(
            proc.preprocess_file(path).with_context(|| format!("reading {}", path.display()))?,
        );
        index.insert(*id, i as i64);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((Tensor::stack(&rows, 0), index))
}

/// Random horizontal flips: easy-VQA's shapes (upright triangles included) and colors are
/// invariant under them. (Vertical flips and transposes were tried and hurt: they make
/// upside-down and sideways triangles the test set never shows.)
pub(super) fn augment(px: &Tensor, rng: &mut SplitMix64) -> Tensor {
    let b = px.size()[0];
    let pick: Vec<bool> = (0..b).map(|_| rng.below(2) == 1).collect();
    let mask = Tensor::from_slice(&pick).view([b, 1, 1, 1]);
    px.flip([3]).where_self(&mask, px)
}

/// Trains the embedded model `cfg.family` names and saves it in `cfg.out`.
pub fn train(cfg: &TrainTinyConfig, force: bool) -> Result<TrainRecord> {
    match cfg.family {
        TinyFamily::Llava => train_llava(cfg, force),
        TinyFamily::Qwen2Vl => super::qwen2vl::train(cfg, force),
    }
}

fn train_llava(cfg: &TrainTinyConfig, force: bool) -> Result<TrainRecord> {
    let Begun { staged, train_set, test_set } = begin(cfg, force)?;
    let t = &cfg.train;
    let dir = staged.dir();

    // Tokenizer and model.
    let texts: Vec<&str> = train_set.questions.iter().map(|q| q.text.as_str()).collect();
    let tok = tokenizer::build(&texts)?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer::save(&tok, &tok_path)?;
    let image_token = i64::from(tok.token_to_id(IMAGE_PLACEHOLDER).context("no <image> token")?);
    let vocab = i64::from(tok.get_vocab_size(true) as u32);
    let llava_cfg = llava_config(&cfg.arch, vocab, image_token);
    let ptok = PromptTokenizer::from_file(
        &tok_path,
        ImageSplice::Token { id: image_token, expanded_len: llava_cfg.image_feature_len() },
        Some(i64::from(tokenizer::BOS)),
    )?;
    let vb = VarBuilder::fresh(Device::Cpu, Kind::Float);
    let model = Llava::build(&vb, &llava_cfg)?;
    let vars = vb.created_variables();
    let parameters: i64 = vars.iter().map(|(_, v)| v.numel() as i64).sum();
    tracing::info!(parameters, vocab, "tiny LLaVA built");
    let proc_cfg = ImageProcessorConfig::clip_default(64);
    let proc = ImageProcessor::new(proc_cfg.clone());
    let (train_px, train_idx) = load_pixels(&train_set, &proc)?;
    let (test_px, test_idx) = load_pixels(&test_set, &proc)?;
    let mut rng = SplitMix64::new(t.seed as u64);
    let start = Instant::now();

    // ① Vision tower alone: linear shape/color heads on mean-pooled selected features.
    let hv = cfg.arch.vision_hidden;
    let heads = LabelHeads::new(hv);
    let decays = |name: &str, v: &Tensor| v.dim() >= 2 && !name.contains("embedding");
    let mut params: Vec<(Tensor, bool)> = vars
        .iter()
        .filter(|(n, _)| n.starts_with("vision_tower."))
        .map(|(n, v)| (v.shallow_clone(), decays(n, v)))
        .collect();
    params.extend(heads.params());
    let mut opt =
        AdamW::new(params, AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() });
    let labels = image_labels(&train_set, &train_idx);
    let n_img = train_px.size()[0] as usize;
    let steps1 = t.vision_epochs * n_img.div_ceil(t.batch_size);
    let pb = progress::bar(steps1 as u64, "① vision");
    let pool =
        |px: &Tensor| model.vision_tower.forward(px, &mut NoHook).mean_dim(1, false, Kind::Float);
    let mut step = 0;
    for epoch in 0..t.vision_epochs {
        let mut epoch_loss = 0.0;
        let mut order: Vec<i64> = (0..n_img as i64).collect();
        rng.shuffle(&mut order);
        for chunk in order.chunks(t.batch_size) {
            let idx = Tensor::from_slice(chunk);
            let f = pool(&augment(&train_px.index_select(0, &idx), &mut rng));
            let loss = heads.loss(&f, &labels, &idx);
            let l = optimize(
                &mut opt,
                &loss,
                t.grad_clip,
                lr_at(step, steps1, t.vision_lr, t.warmup_fraction),
            );
            step += 1;
            epoch_loss += l * chunk.len() as f64 / n_img as f64;
            pb.set_message(format!("loss {l:.3}"));
            pb.inc(1);
        }
        tracing::info!(epoch, loss = epoch_loss, "stage ① epoch");
    }
    pb.finish_and_clear();
    let stage1_seconds = start.elapsed().as_secs_f64();
    let (shape_acc, color_acc) = {
        let _g = tch::no_grad_guard();
        let f = pool(&test_px);
        heads.accuracy(&f, &image_labels(&test_set, &test_idx))
    };
    tracing::info!(stage1_seconds, shape_acc, color_acc, "stage ① done (test image labels)");

    // ② Projector + decoder on the questions, vision tower frozen (its features precomputed).
    for (n, v) in &vars {
        if n.starts_with("vision_tower.") {
            let _ = v.shallow_clone().set_requires_grad(false);
        }
    }
    let train_feats = {
        let _g = tch::no_grad_guard();
        let chunks: Vec<Tensor> = (0..n_img as i64)
            .step_by(256)
            .map(|s| {
                model
                    .vision_tower
                    .forward(&train_px.narrow(0, s, 256.min(n_img as i64 - s)), &mut NoHook)
            })
            .collect();
        Tensor::cat(&chunks, 0)
    };
    let mut opt = AdamW::new(
        vars.iter()
            .filter(|(n, _)| !n.starts_with("vision_tower."))
            .map(|(n, v)| (v.shallow_clone(), decays(n, v)))
            .collect(),
        AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
    );
    let prompts: Vec<Vec<Piece>> =
        train_set.questions.iter().map(|q| with_answer(&ptok, q)).collect::<Result<_>>()?;
    let n_q = train_set.questions.len();
    let steps2 = t.lm_epochs * n_q.div_ceil(t.batch_size);
    let pb = progress::bar(steps2 as u64, "② language");
    let mut step = 0;
    let s2_start = Instant::now();
    for epoch in 0..t.lm_epochs {
        let mut epoch_loss = 0.0;
        let mut order: Vec<usize> = (0..n_q).collect();
        rng.shuffle(&mut order);
        for chunk in order.chunks(t.batch_size) {
            let rows: Vec<i64> =
                chunk.iter().map(|&i| train_idx[&train_set.questions[i].image_id]).collect();
            let feats = model
                .projector
                .forward(&train_feats.index_select(0, &Tensor::from_slice(&rows)), &mut NoHook);
            let seqs: Vec<Vec<Piece>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let images: Vec<Tensor> =
                (0..chunk.len() as i64).map(|b| feats.narrow(0, b, 1)).collect();
            let batch = model.prepare(&seqs, &images)?;
            let h = model.decode_hidden(&batch, None, &mut NoHook);
            let tlen = h.size()[1];
            // Every row ends with [answer, </s>]: positions T-3 and T-2 predict them.
            let logits = model.language_model.head(&h.narrow(1, tlen - 3, 2));
            let targets: Vec<i64> = seqs.iter().flat_map(|s| last_two(s)).collect();
            let targets = Tensor::from_slice(&targets);
            let loss = logits.reshape([-1, vocab]).cross_entropy_for_logits(&targets);
            let l = optimize(
                &mut opt,
                &loss,
                t.grad_clip,
                lr_at(step, steps2, t.lm_lr, t.warmup_fraction),
            );
            step += 1;
            epoch_loss += l * chunk.len() as f64 / n_q as f64;
            pb.set_message(format!("loss {l:.4}"));
            pb.inc(1);
            if step % 100 == 0 {
                tracing::info!(epoch, step, steps = steps2, loss = l, "stage ②");
            }
        }
        tracing::info!(epoch, loss = epoch_loss, "stage ② epoch");
    }
    pb.finish_and_clear();
    let stage2_seconds = s2_start.elapsed().as_secs_f64();
    let train_seconds = start.elapsed().as_secs_f64();

    // Save, reload strictly through the public loader, evaluate on the full test split.
    save_llava_hf(&model, &proc_cfg, dir)?;
    drop(model);
    let bundle = LlavaBundle::load(dir, &LoadOptions::default())?;
    let pb = progress::bar(test_set.questions.len() as u64, "test eval");
    let out = evaluate(&bundle, &test_set, &test_set.questions, TEMPLATE, 128, &mut NoHook, &pb)?;
    pb.finish_and_clear();
    let record = TrainRecord {
        config: cfg.clone(),
        parameters,
        vocab_size: vocab,
        stage1_seconds,
        stage1_test_shape_accuracy: shape_acc,
        stage1_test_color_accuracy: color_acc,
        stage2_seconds,
        train_seconds,
        test_accuracy: out.accuracy(),
        torch_threads: tch::get_num_threads(),
        libtorch: qvlm_core::device::libtorch_version(),
    };
    let path = dir.join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    drop(bundle);
    staged.commit()?;
    Ok(record)
}

/// The prompt pieces of a question with `[answer, </s>]` appended.
pub(super) fn with_answer(tok: &PromptTokenizer, q: &Question) -> Result<Vec<Piece>> {
    let mut pieces = tok.tokenize_prompt(&prompt(TEMPLATE, &q.text), 1)?;
    let answer = tok
        .token_id(&q.answer)
        .with_context(|| format!("answer `{}` is not in the vocabulary", q.answer))?;
    match pieces.last_mut() {
        Some(Piece::Tokens(t)) => t.extend([answer, i64::from(tokenizer::EOS)]),
        _ => pieces.push(Piece::Tokens(vec![answer, i64::from(tokenizer::EOS)])),
    }
    Ok(pieces)
}

pub(super) fn last_two(pieces: &[Piece]) -> [i64; 2] {
    match pieces.last() {
        Some(Piece::Tokens(t)) if t.len() >= 2 => [t[t.len() - 2], t[t.len() - 1]],
        _ => [0, 0],
    }
}

pub fn load_config(path: &Path) -> Result<TrainTinyConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_config(&text, path)
}

/// Parses and validates config text; `path` names the file in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<TrainTinyConfig> {
    crate::config::ConfigKind::TrainTiny.expect(text, path)?;
    let mut cfg: TrainTinyConfig = crate::config::parse_toml(text, path)?;
    cfg.file = path.to_path_buf();
    cfg.check()?;
    Ok(cfg)
}
