//! `experiments train-tiny configs/train-tiny-qwen2vl.toml`: a tiny Qwen2-VL-style model (its ViT
//! with 2-D rotary positions, the 2 × 2 patch merger, a Qwen2 decoder with q/k/v bias and M-RoPE)
//! trained on easy-VQA with the tiny LLaVA's recipe (① the vision tower alone on image-level
//! shape/color labels, ② merger + decoder with the tower frozen), asked through a chat template
//! of Qwen's form, and saved as a Qwen2-VL checkpoint transformers loads (Qwen's key layout,
//! transformers 5.x's `config.json`, `preprocessor_config.json`, `tokenizer.json`,
//! `chat_template.jinja`, `generation_config.json`).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use qvlm_core::hook::NoHook;
use qvlm_core::io::config::{
    Activation, LlamaConfig, Qwen2VisionConfig, Qwen2VisionKind, Qwen2VlConfig, RopeScaling,
};
use qvlm_core::io::image::{PixelScaling, Rgb8};
use qvlm_core::io::naming::Naming;
use qvlm_core::io::qwen2_image::{Qwen2ImageConfig, Qwen2ImageProcessor};
use qvlm_core::io::safetensors::write_safetensors;
use qvlm_core::io::weights::VarBuilder;
use qvlm_core::model::llava::LoadOptions;
use qvlm_core::model::qwen2_vl::{GridThw, Qwen2Vl, Qwen2VlBundle, Qwen2VlPrompt};
use qvlm_core::optim::{AdamW, AdamWConfig};
use qvlm_core::rng::SplitMix64;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::recipe::{begin, image_labels, lr_at, optimize, Begun, LabelHeads, TrainRecord};
use super::{tokenizer, TinyArch, TrainTinyConfig, IMAGE_SIZE};
use crate::data::easy_vqa::{EasyVqa, Question};
use crate::eval::easy_vqa::evaluate_qwen2_vl;
use crate::progress;

/// The 2 × 2 patch merger of Qwen2-VL.
const MERGE: i64 = 2;
/// A still image is its frame repeated over the temporal patch of 2.
const TEMPORAL_PATCH: i64 = 2;

/// Qwen2-VL-Instruct's chat template without its default system turn (the tiny model's prompts
/// are short): `<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}
/// <|im_end|>\n<|im_start|>assistant\n`.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The special tokens' ids in the tiny tokenizer.
struct SpecialIds {
    image_pad: i64,
    video_pad: i64,
    vision_start: i64,
    vision_end: i64,
    im_end: i64,
}

fn special_ids(tok: &tokenizers::Tokenizer) -> Result<SpecialIds> {
    let id = |s: &str| -> Result<i64> {
        Ok(i64::from(tok.token_to_id(s).with_context(|| format!("no {s} token"))?))
    };
    Ok(SpecialIds {
        image_pad: id("<|image_pad|>")?,
        video_pad: id("<|video_pad|>")?,
        vision_start: id("<|vision_start|>")?,
        vision_end: id("<|vision_end|>")?,
        im_end: id("<|im_end|>")?,
    })
}

/// M-RoPE's split of a head's `head_dim / 2` frequencies into (temporal, height, width), in
/// Qwen2-VL-7B's proportions (16, 24, 24 of 64): height and width `3/8` each, the rest temporal.
fn mrope_section(head_dim: i64) -> [i64; 3] {
    let half = head_dim / 2;
    let side = half * 3 / 8;
    [half - 2 * side, side, side]
}

fn model_config(arch: &TinyArch, vocab: i64, ids: &SpecialIds) -> Qwen2VlConfig {
    let head_dim = arch.text_hidden / arch.text_heads;
    Qwen2VlConfig {
        vision: Qwen2VisionConfig {
            depth: arch.vision_layers,
            embed_dim: arch.vision_hidden,
            hidden_size: arch.text_hidden,
            num_heads: arch.vision_heads,
            intermediate_size: arch.vision_intermediate,
            in_channels: 3,
            patch_size: arch.patch_size,
            temporal_patch_size: TEMPORAL_PATCH,
            spatial_merge_size: MERGE,
            hidden_act: Activation::QuickGelu,
            rope_theta: 10000.0,
            kind: Qwen2VisionKind::Qwen2Vl,
        },
        text: LlamaConfig {
            vocab_size: vocab,
            hidden_size: arch.text_hidden,
            intermediate_size: arch.text_intermediate,
            num_hidden_layers: arch.text_layers,
            num_attention_heads: arch.text_heads,
            num_key_value_heads: arch.text_kv_heads,
            head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 512,
            tie_word_embeddings: false,
            attention_bias: false,
            qkv_bias: true,
            mrope_section: Some(mrope_section(head_dim)),
            mlp_bias: false,
            bos_token_id: Some(i64::from(tokenizer::BOS)),
            eos_token_ids: vec![ids.im_end],
            pad_token_id: Some(i64::from(tokenizer::PAD)),
        },
        image_token_id: ids.image_pad,
        video_token_id: ids.video_pad,
        vision_start_token_id: ids.vision_start,
        vision_end_token_id: ids.vision_end,
    }
}

/// easy-VQA's 64 × 64 images kept at their size: 8 × 8 patches of 8 px, 16 merged tokens.
fn image_config(arch: &TinyArch) -> Qwen2ImageConfig {
    let area = IMAGE_SIZE * IMAGE_SIZE;
    Qwen2ImageConfig {
        patch_size: arch.patch_size,
        merge_size: MERGE,
        temporal_patch_size: TEMPORAL_PATCH,
        min_pixels: area / 4,
        max_pixels: area * 4,
        do_resize: true,
        scaling: PixelScaling::CLIP,
    }
}

/// transformers 5.x's `config.json` of the model.
fn config_json(cfg: &Qwen2VlConfig) -> serde_json::Value {
    let (v, t) = (&cfg.vision, &cfg.text);
    json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "dtype": "float32",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "qwen2_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_ids[0],
            "pad_token_id": t.pad_token_id,
            "tie_word_embeddings": false,
            "use_sliding_window": false,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": t.mrope_section,
            },
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "mlp_ratio": v.intermediate_size / v.embed_dim,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "hidden_act": "quick_gelu",
        },
    })
}

fn preprocessor_json(c: &Qwen2ImageConfig) -> serde_json::Value {
    let s = &c.scaling;
    json!({
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_convert_rgb": true,
        "do_resize": c.do_resize,
        "do_rescale": s.do_rescale,
        "rescale_factor": s.rescale_factor,
        "do_normalize": s.do_normalize,
        "image_mean": s.image_mean,
        "image_std": s.image_std,
        "resample": 3,
        "patch_size": c.patch_size,
        "temporal_patch_size": c.temporal_patch_size,
        "merge_size": c.merge_size,
        "size": {"shortest_edge": c.min_pixels, "longest_edge": c.max_pixels},
    })
}

fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// The image mirrored left to right.
fn flipped(image: &Rgb8) -> Rgb8 {
    let (w, h) = (image.width as usize, image.height as usize);
    let mut data = Vec::with_capacity(image.data.len());
    for y in 0..h {
        for x in (0..w).rev() {
            data.extend_from_slice(&image.data[(y * w + x) * 3..(y * w + x) * 3 + 3]);
        }
    }
    Rgb8 { width: image.width, height: image.height, data }
}

/// A split's images as the tower's input.
struct SplitPatches {
    /// `[images, patches, patch_len]`.
    patches: Tensor,
    /// The same images mirrored left to right (when asked).
    mirrored: Option<Tensor>,
    /// Every image's grid (easy-VQA's images are all 64 × 64).
    grid: GridThw,
    /// Image id → row.
    index: BTreeMap<u32, i64>,
}

/// Every image of a split as patches (and, with `flips`, the mirrored images too).
fn load_patches(data: &EasyVqa, proc: &Qwen2ImageProcessor, flips: bool) -> Result<SplitPatches> {
    let ids = data.image_ids();
    let pb = progress::bar(ids.len() as u64, &format!("images {}", data.split.name()));
    let (mut rows, mut mirrored, mut index, mut grid) = (vec![], vec![], BTreeMap::new(), None);
    for (i, id) in ids.iter().enumerate() {
        let path = data.image_path(*id).context("image without a path")?;
        let image = Rgb8::open(path).with_context(|| format!("reading {}", path.display()))?;
        let (p, g) = proc.preprocess(&image)?;
        if *grid.get_or_insert(g) != g {
            anyhow::bail!("{}: grid {g:?} differs from the first image's", path.display());
        }
        rows.push(p);
        if flips {
            mirrored.push(proc.preprocess(&flipped(&image))?.0);
        }
        index.insert(*id, i as i64);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let grid = grid.context("no images")?;
    let mirrored = flips.then(|| Tensor::stack(&mirrored, 0));
    Ok(SplitPatches { patches: Tensor::stack(&rows, 0), mirrored, grid, index })
}

/// The prompt ids of a question (chat template, the image's `<|image_pad|>` expanded) with
/// `[answer, <|im_end|>]` appended.
fn with_answer(bundle_tok: &Tokenized, q: &Question) -> Result<Vec<i64>> {
    let mut ids = bundle_tok.prompt(&q.text)?;
    let answer = bundle_tok
        .tok
        .token_to_id(&q.answer)
        .with_context(|| format!("answer `{}` is not in the vocabulary", q.answer))?;
    ids.extend([i64::from(answer), bundle_tok.im_end]);
    Ok(ids)
}

/// The tokenizer and template as training renders prompts (the saved files render the same).
struct Tokenized {
    tok: tokenizers::Tokenizer,
    template: qvlm_core::io::chat_template::ChatTemplate,
    image_pad: i64,
    tokens_per_image: usize,
    im_end: i64,
}

impl Tokenized {
    fn prompt(&self, question: &str) -> Result<Vec<i64>> {
        use qvlm_core::io::chat_template::ChatTemplate;
        let text = self.template.render(&ChatTemplate::user_turn(1, question), true)?;
        let enc = self.tok.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut out = Vec::with_capacity(enc.get_ids().len() + self.tokens_per_image);
        for &id in enc.get_ids() {
            let id = i64::from(id);
            if id == self.image_pad {
                out.extend(std::iter::repeat_n(id, self.tokens_per_image));
            } else {
                out.push(id);
            }
        }
        Ok(out)
    }
}

pub fn train(cfg: &TrainTinyConfig, force: bool) -> Result<TrainRecord> {
    let Begun { staged, train_set, test_set } = begin(cfg, force)?;
    let t = &cfg.train;
    let dir = staged.dir();

    // Tokenizer, chat template, model.
    let texts: Vec<&str> = train_set.questions.iter().map(|q| q.text.as_str()).collect();
    let tok = tokenizer::build_qwen(&texts)?;
    tokenizer::save(&tok, &dir.join("tokenizer.json"))?;
    std::fs::write(dir.join("chat_template.jinja"), CHAT_TEMPLATE)
        .with_context(|| format!("writing {}", dir.join("chat_template.jinja").display()))?;
    let ids = special_ids(&tok)?;
    let vocab = i64::from(tok.get_vocab_size(true) as u32);
    let model_cfg = model_config(&cfg.arch, vocab, &ids);
    let vb = VarBuilder::fresh(Device::Cpu, Kind::Float);
    let model = Qwen2Vl::build(&vb, &model_cfg)?;
    let vars = vb.created_variables();
    let parameters: i64 = vars.iter().map(|(_, v)| v.numel() as i64).sum();
    tracing::info!(parameters, vocab, "tiny Qwen2-VL built");
    let img_cfg = image_config(&cfg.arch);
    let proc = Qwen2ImageProcessor::new(img_cfg.clone());
    let train = load_patches(&train_set, &proc, true)?;
    let (train_px, grid, train_idx) = (train.patches, train.grid, train.index);
    let train_flip = train.mirrored.context("mirrored images")?;
    let test = load_patches(&test_set, &proc, false)?;
    let (test_px, test_idx) = (test.patches, test.index);
    let per_image = grid.iter().product::<i64>();
    let tokens_per_image = per_image / (MERGE * MERGE);
    let mut rng = SplitMix64::new(t.seed as u64);
    let start = Instant::now();
    let decays = |name: &str, v: &Tensor| v.dim() >= 2 && !name.contains("embed_tokens");
    // A batch of images as the tower's input: their patches one after the other.
    let flat = |px: &Tensor| px.reshape([-1, px.size()[2]]);
    let grids = |n: usize| vec![grid; n];

    // ① Vision tower alone: linear shape/color heads on each image's mean last hidden state.
    let hv = cfg.arch.vision_hidden;
    let heads = LabelHeads::new(hv);
    let vision = |n: &str| n.starts_with("visual.") && !n.starts_with("visual.merger.");
    let mut params: Vec<(Tensor, bool)> = vars
        .iter()
        .filter(|(n, _)| vision(n))
        .map(|(n, v)| (v.shallow_clone(), decays(n, v)))
        .collect();
    params.extend(heads.params());
    let mut opt =
        AdamW::new(params, AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() });
    let labels = image_labels(&train_set, &train_idx);
    let n_img = train_px.size()[0] as usize;
    let steps1 = t.vision_epochs * n_img.div_ceil(t.batch_size);
    let pb = progress::bar(steps1 as u64, "① vision");
    let hidden = |px: &Tensor| -> Result<Tensor> {
        let b = px.size()[0];
        let out = model.visual.forward(&flat(px), &grids(b as usize), &mut NoHook)?;
        Ok(out.hidden.reshape([b, per_image, -1]))
    };
    let mut step = 0;
    for epoch in 0..t.vision_epochs {
        let mut epoch_loss = 0.0;
        let mut order: Vec<i64> = (0..n_img as i64).collect();
        rng.shuffle(&mut order);
        for chunk in order.chunks(t.batch_size) {
            let idx = Tensor::from_slice(chunk);
            // Random horizontal flips (shapes and colors are invariant under them).
            let pick: Vec<bool> = (0..chunk.len()).map(|_| rng.below(2) == 1).collect();
            let mask = Tensor::from_slice(&pick).view([chunk.len() as i64, 1, 1]);
            let px =
                train_flip.index_select(0, &idx).where_self(&mask, &train_px.index_select(0, &idx));
            let f = hidden(&px)?.mean_dim(1, false, Kind::Float);
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
        let n = test_px.size()[0];
        let parts: Vec<Tensor> = (0..n)
            .step_by(256)
            .map(|s| {
                hidden(&test_px.narrow(0, s, 256.min(n - s)))
                    .map(|h| h.mean_dim(1, false, Kind::Float))
            })
            .collect::<Result<_>>()?;
        let f = Tensor::cat(&parts, 0);
        heads.accuracy(&f, &image_labels(&test_set, &test_idx))
    };
    tracing::info!(stage1_seconds, shape_acc, color_acc, "stage ① done (test image labels)");

    // ② Merger + decoder on the questions, the tower frozen (its outputs precomputed).
    for (n, v) in &vars {
        if vision(n) {
            let _ = v.shallow_clone().set_requires_grad(false);
        }
    }
    let train_hidden = {
        let _g = tch::no_grad_guard();
        let n = n_img as i64;
        let parts: Vec<Tensor> = (0..n)
            .step_by(256)
            .map(|s| hidden(&train_px.narrow(0, s, 256.min(n - s))))
            .collect::<Result<_>>()?;
        Tensor::cat(&parts, 0)
    };
    let mut opt = AdamW::new(
        vars.iter()
            .filter(|(n, _)| !vision(n))
            .map(|(n, v)| (v.shallow_clone(), decays(n, v)))
            .collect(),
        AdamWConfig { weight_decay: t.weight_decay, ..AdamWConfig::default() },
    );
    let tokenized = Tokenized {
        tok: tok.clone(),
        template: qvlm_core::io::chat_template::ChatTemplate::from_dir(dir)?,
        image_pad: ids.image_pad,
        tokens_per_image: tokens_per_image as usize,
        im_end: ids.im_end,
    };
    let prompts: Vec<Vec<i64>> =
        train_set.questions.iter().map(|q| with_answer(&tokenized, q)).collect::<Result<_>>()?;
    let n_q = train_set.questions.len();
    let steps2 = t.lm_epochs * n_q.div_ceil(t.batch_size);
    let pb = progress::bar(steps2 as u64, "② language");
    let mut step = 0;
    let s2_start = Instant::now();
    let one = [grid];
    for epoch in 0..t.lm_epochs {
        let mut epoch_loss = 0.0;
        let mut order: Vec<usize> = (0..n_q).collect();
        rng.shuffle(&mut order);
        for chunk in order.chunks(t.batch_size) {
            let rows: Vec<i64> =
                chunk.iter().map(|&i| train_idx[&train_set.questions[i].image_id]).collect();
            let h = train_hidden.index_select(0, &Tensor::from_slice(&rows));
            let tokens = model.visual.merger.forward(&h.reshape([-1, hv]), &mut NoHook);
            let tokens = tokens.reshape([chunk.len() as i64, tokens_per_image, -1]);
            let per_row: Vec<Tensor> = (0..chunk.len() as i64).map(|b| tokens.get(b)).collect();
            let batch_prompts: Vec<Qwen2VlPrompt<'_>> = chunk
                .iter()
                .zip(&per_row)
                .map(|(&i, t)| Qwen2VlPrompt {
                    ids: &prompts[i],
                    grids: &one,
                    image_tokens: Some(t),
                })
                .collect();
            let batch = model.prepare(&batch_prompts)?;
            let hs = model.decode_hidden(
                &batch.embeds,
                &batch.mask,
                &batch.positions,
                None,
                &mut NoHook,
            )?;
            let tlen = hs.size()[1];
            // Every row ends with [answer, <|im_end|>]: positions T-3 and T-2 predict them.
            let logits = model.language_model.head(&hs.narrow(1, tlen - 3, 2));
            let targets: Vec<i64> =
                chunk.iter().flat_map(|&i| prompts[i][prompts[i].len() - 2..].to_vec()).collect();
            let loss =
                logits.reshape([-1, vocab]).cross_entropy_for_logits(&Tensor::from_slice(&targets));
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

    // Save in Qwen's key layout, reload strictly through the public loader, evaluate.
    let tensors: Vec<(String, Tensor)> =
        vars.iter().map(|(n, v)| (Naming::Qwen2Vl.stored_key(n).1, v.detach())).collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        &BTreeMap::from([("format".into(), "pt".into())]),
    )?;
    write_json(&dir.join("config.json"), &config_json(&model_cfg))?;
    write_json(&dir.join("preprocessor_config.json"), &preprocessor_json(&img_cfg))?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": tokenizer::BOS, "eos_token_id": ids.im_end, "pad_token_id": tokenizer::PAD}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }),
    )?;
    drop(model);
    let bundle = Qwen2VlBundle::load(dir, &LoadOptions::default())?;
    let pb = progress::bar(test_set.questions.len() as u64, "test eval");
    let out = evaluate_qwen2_vl(&bundle, &test_set, &test_set.questions, 128, &mut NoHook, &pb)?;
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
    write_json(&dir.join("training.json"), &serde_json::to_value(&record)?)?;
    drop(bundle);
    staged.commit()?;
    Ok(record)
}
