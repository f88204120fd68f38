//! The CLIP ViT vision tower as LLaVA uses it: patch convolution, class and position embeddings,
//! pre-layernorm, pre-norm encoder layers; features come from the hidden states at
//! `vision_feature_layer`. Mirrors transformers' `CLIPVisionTransformer`
//! (<https://github.com/huggingface/transformers/blob/v4.46.0/src/transformers/models/clip/modeling_clip.py#L1059-L1110>).

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::hook::LinearHook;
use crate::io::config::{Activation, ClipVisionConfig, LlavaConfig, SelectFeature};
use crate::io::weights::{Init, VarBuilder};
use crate::layer_id::{LayerId, Slot, Tower};
use crate::model::linear::Linear;
use crate::model::norm::LayerNorm;

pub(crate) fn activate(act: Activation, x: &Tensor) -> Tensor {
    match act {
        Activation::QuickGelu => x * (x * 1.702).sigmoid(),
        Activation::Gelu => x.gelu("none"),
        Activation::GeluTanh => x.gelu("tanh"),
        Activation::Silu => x.silu(),
    }
}

/// Fresh-weight scales of transformers' `CLIPPreTrainedModel._init_weights`: q/k/v and fc2 get
/// `h^-½ (2L)^-½`, out_proj `h^-½` (and fc1 `(2h)^-½`).
fn clip_init_std(cfg: &ClipVisionConfig) -> (f64, f64) {
    let h = cfg.hidden_size as f64;
    let l = cfg.num_hidden_layers as f64;
    (h.powf(-0.5) * (2.0 * l).powf(-0.5), h.powf(-0.5))
}

#[derive(Debug)]
pub struct ClipEmbeddings {
    pub patch_embedding: Tensor,
    pub class_embedding: Tensor,
    pub position_embedding: Tensor,
    patch_size: i64,
    /// The canonical name it was loaded under (`vision_tower.embeddings`).
    pub path: String,
}

impl ClipEmbeddings {
    fn load(vb: &VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            patch_embedding: vb.pp("patch_embedding").get(
                "weight",
                &[h, cfg.num_channels, cfg.patch_size, cfg.patch_size],
                Init::Normal { std: 0.02 },
            )?,
            class_embedding: vb.get(
                "class_embedding",
                &[h],
                Init::Normal { std: (h as f64).powf(-0.5) },
            )?,
            position_embedding: vb.pp("position_embedding").get(
                "weight",
                &[cfg.num_patches() + 1, h],
                Init::Normal { std: 0.02 },
            )?,
            patch_size: cfg.patch_size,
            path: vb.path(),
        })
    }

    fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        let p = &self.path;
        out.push((format!("{p}.patch_embedding.weight"), self.patch_embedding.shallow_clone()));
        out.push((format!("{p}.class_embedding"), self.class_embedding.shallow_clone()));
        out.push((
            format!("{p}.position_embedding.weight"),
            self.position_embedding.shallow_clone(),
        ));
    }

    /// `[B, C, H, W]` pixels → `[B, 1 + patches, hidden]`.
    fn forward(&self, pixels: &Tensor) -> Tensor {
        let kind = self.patch_embedding.kind();
        let patches = pixels.to_kind(kind).conv2d(
            &self.patch_embedding,
            None::<Tensor>,
            [self.patch_size, self.patch_size],
            [0, 0],
            [1, 1],
            1,
        );
        let patches = patches.flatten(2, -1).transpose(1, 2);
        let batch = patches.size()[0];
        let hidden = self.class_embedding.size()[0];
        let cls = self.class_embedding.expand([batch, 1, hidden], true);
        Tensor::cat(&[cls, patches], 1) + self.position_embedding.unsqueeze(0)
    }
}

#[derive(Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: i64,
    head_dim: i64,
}

impl ClipAttention {
    fn load(vb: &VarBuilder, cfg: &ClipVisionConfig, block: u32) -> Result<Self> {
        let h = cfg.hidden_size;
        let id = |slot| LayerId::new(Tower::Vision, block, slot);
        let (inner, outer) = clip_init_std(cfg);
        Ok(Self {
            q_proj: Linear::load_init(&vb.pp("q_proj"), id(Slot::QProj), h, h, true, inner)?,
            k_proj: Linear::load_init(&vb.pp("k_proj"), id(Slot::KProj), h, h, true, inner)?,
            v_proj: Linear::load_init(&vb.pp("v_proj"), id(Slot::VProj), h, h, true, inner)?,
            out_proj: Linear::load_init(&vb.pp("out_proj"), id(Slot::OutProj), h, h, true, outer)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let split = |y: Tensor| y.view([b, t, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(x, hook));
        let k = split(self.k_proj.forward(x, hook));
        let v = split(self.v_proj.forward(x, hook));
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = q.matmul(&k.transpose(-1, -2)) * scale;
        let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        let out =
            probs.matmul(&v).transpose(1, 2).contiguous().view([b, t, self.heads * self.head_dim]);
        self.out_proj.forward(&out, hook)
    }
}

#[derive(Debug)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn load(vb: &VarBuilder, cfg: &ClipVisionConfig, block: u32) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            self_attn: ClipAttention::load(&vb.pp("self_attn"), cfg, block)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: Linear::load(
                &mlp.pp("fc1"),
                LayerId::new(Tower::Vision, block, Slot::Fc1),
                h,
                i,
                true,
            )?,
            fc2: Linear::load(
                &mlp.pp("fc2"),
                LayerId::new(Tower::Vision, block, Slot::Fc2),
                i,
                h,
                true,
            )?,
            act: cfg.hidden_act,
        })
    }

    /// One pre-norm encoder layer: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
    pub fn forward(&self, x: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x), hook);
        let h = self.fc1.forward(&self.layer_norm2.forward(&x), hook);
        &x + self.fc2.forward(&activate(self.act, &h), hook)
    }

    fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        self.layer_norm1.named_tensors(out);
        self.layer_norm2.named_tensors(out);
        for l in self.linears() {
            l.named_tensors(out);
        }
    }

    pub fn linears(&self) -> [&Linear; 6] {
        let a = &self.self_attn;
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &self.fc1, &self.fc2]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 6] {
        let a = &mut self.self_attn;
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj, &mut self.fc1, &mut self.fc2]
    }
}

#[derive(Debug)]
pub struct ClipVisionTower {
    pub embeddings: ClipEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    /// Loaded so the checkpoint is fully accounted for; LLaVA never uses it (features are taken
    /// from hidden states before it).
    pub post_layernorm: LayerNorm,
    /// Number of encoder layers whose output reaches the features.
    layers_used: usize,
    select: SelectFeature,
}

impl ClipVisionTower {
    pub fn load(vb: &VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        let v = &cfg.vision;
        let enc = vb.pp("encoder").pp("layers");
        let layers = (0..v.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&enc.pp(i), v, i as u32))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: ClipEmbeddings::load(&vb.pp("embeddings"), v)?,
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), v.hidden_size, v.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(
                &vb.pp("post_layernorm"),
                v.hidden_size,
                v.layer_norm_eps,
            )?,
            layers_used: cfg.vision_layers_used() as usize,
            select: cfg.select_feature,
        })
    }

    /// Every tensor under its canonical name (the unused layers and `post_layernorm` too).
    pub fn named_tensors(&self, out: &mut Vec<(String, Tensor)>) {
        self.embeddings.named_tensors(out);
        self.pre_layrnorm.named_tensors(out);
        for layer in &self.layers {
            layer.named_tensors(out);
        }
        self.post_layernorm.named_tensors(out);
    }

    /// The encoder layers whose output reaches LLaVA's image features, in execution order.
    pub fn used_layers(&self) -> &[ClipEncoderLayer] {
        &self.layers[..self.layers_used]
    }

    pub fn used_layers_mut(&mut self) -> &mut [ClipEncoderLayer] {
        &mut self.layers[..self.layers_used]
    }

    /// Embeddings + pre-layernorm: hidden state 0.
    pub fn embed(&self, pixels: &Tensor) -> Tensor {
        self.pre_layrnorm.forward(&self.embeddings.forward(pixels))
    }

    /// The selected hidden state with the select strategy applied: `[B, feature_len, hidden]`.
    pub fn select(&self, hidden: &Tensor) -> Tensor {
        match self.select {
            SelectFeature::Default => hidden.narrow(1, 1, hidden.size()[1] - 1),
            SelectFeature::Full => hidden.shallow_clone(),
        }
    }

    /// `[B, C, H, W]` normalised pixels → image features before the projector.
    pub fn forward(&self, pixels: &Tensor, hook: &mut dyn LinearHook) -> Tensor {
        let mut h = self.embed(pixels);
        for layer in self.used_layers() {
            h = layer.forward(&h, hook);
        }
        self.select(&h)
    }
}
