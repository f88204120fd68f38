//! Model configuration from `config.json`, validated: every key is read with its type checked,
//! defaults are transformers' own defaults, impossible combinations (heads that do not divide the
//! width, a select layer outside the tower) are errors naming the key and the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Activation functions used by CLIP, the projector and LLaMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Silu => "silu",
        }
    }
}

/// Which hidden states of the vision tower feed the projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectFeature {
    /// Drop the CLS token (LLaVA's `patch` / llava-hf's `default`).
    Default,
    /// Keep the CLS token (`cls_patch` / `full`).
    Full,
}

/// The projector between the vision tower and the language model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectorKind {
    /// One linear layer (LLaVA-v1.3, `mm_projector_type = "linear"`).
    Linear,
    /// linear → GELU → linear (LLaVA-1.5, `mlp2x_gelu`; every llava-hf checkpoint).
    Mlp2xGelu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl ClipVisionConfig {
    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RopeScaling {
    Default,
    /// Position interpolation: positions divided by `factor`.
    Linear {
        factor: f64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// A bias on q, k, v and o (LLaMA's `attention_bias`).
    pub attention_bias: bool,
    /// A bias on q, k and v only, whatever `attention_bias` says (Qwen2's attention).
    #[serde(default)]
    pub qkv_bias: bool,
    pub mlp_bias: bool,
    /// Multimodal rotary positions (Qwen2-VL's M-RoPE): the rotary frequencies of each head are
    /// split into three runs of these lengths (they sum to `head_dim / 2`), turned by the
    /// temporal, row and column position of the token. `None`: one position per token.
    #[serde(default)]
    pub mrope_section: Option<[i64; 3]>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

/// Which checkpoint family a directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    LlavaHf,
    /// liuhaotian/LLaVA: LLaMA config with `mm_*` keys, CLIP in a separate directory.
    Original,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    pub format: CheckpointFormat,
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    pub projector: ProjectorKind,
    pub projector_act: Activation,
    pub projector_bias: bool,
    /// Token id of the `<image>` placeholder (llava-hf); `None` for original LLaVA, which splices
    /// at the literal `<image>` in the prompt text.
    pub image_token_id: Option<i64>,
    /// Index into the vision tower's hidden states (0 = embeddings, negative from the end).
    pub vision_feature_layer: i64,
    pub select_feature: SelectFeature,
    /// Original LLaVA's `mm_use_im_start_end`: wrap the image with `<im_start>`/`<im_end>`.
    pub use_im_start_end: bool,
    /// Original LLaVA's `mm_vision_tower` (where the CLIP weights come from).
    pub clip_source: Option<String>,
}

impl LlavaConfig {
    /// Number of encoder layers actually run (layers after the select layer never affect LLaVA).
    pub fn vision_layers_used(&self) -> i64 {
        let n = self.vision.num_hidden_layers;
        let idx = if self.vision_feature_layer < 0 {
            n + 1 + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        idx.clamp(0, n)
    }

    /// Image features per image after the select strategy.
    pub fn image_feature_len(&self) -> i64 {
        match self.select_feature {
            SelectFeature::Default => self.vision.num_patches(),
            SelectFeature::Full => self.vision.num_patches() + 1,
        }
    }
}

/// A JSON object with its file, for typed reads with errors naming `file` and `key`.
pub(crate) struct Fields<'a> {
    file: &'a Path,
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(file: &'a Path, prefix: &str, map: &'a Map<String, Value>) -> Self {
        Self { file, prefix: prefix.to_string(), map }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(self.file, &self.key(key), reason)
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    pub(crate) fn int(&self, key: &str, default: Option<i64>) -> Result<i64> {
        match self.map.get(key) {
            Some(Value::Number(n)) => {
                n.as_i64().ok_or_else(|| self.err(key, format!("expected an integer, found {n}")))
            }
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "missing (required)")),
            Some(other) => Err(self.err(key, format!("expected an integer, found {other}"))),
        }
    }

    pub(crate) fn positive(&self, key: &str, default: Option<i64>) -> Result<i64> {
        let v = self.int(key, default)?;
        if v <= 0 {
            return Err(self.err(key, format!("must be positive, found {v}")));
        }
        Ok(v)
    }

    pub(crate) fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        if self.has(key) {
            self.int(key, None).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            Some(Value::Number(n)) => {
                n.as_f64().ok_or_else(|| self.err(key, format!("expected a number, found {n}")))
            }
            None | Some(Value::Null) => Ok(default),
            Some(other) => Err(self.err(key, format!("expected a number, found {other}"))),
        }
    }

    pub(crate) fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            Some(Value::Bool(b)) => Ok(*b),
            None | Some(Value::Null) => Ok(default),
            Some(other) => Err(self.err(key, format!("expected true or false, found {other}"))),
        }
    }

    pub(crate) fn string(&self, key: &str, default: Option<&str>) -> Result<String> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) => {
                default.map(str::to_string).ok_or_else(|| self.err(key, "missing (required)"))
            }
            Some(other) => Err(self.err(key, format!("expected a string, found {other}"))),
        }
    }

    pub(crate) fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.map.get(key) {
            Some(Value::Object(m)) => Ok(Some(m)),
            None | Some(Value::Null) => Ok(None),
            Some(other) => Err(self.err(key, format!("expected an object, found {other}"))),
        }
    }

    pub(crate) fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.string(key, Some(default))?;
        Activation::parse(&name).ok_or_else(|| {
            self.err(
                key,
                format!(
                    "unsupported activation `{name}` (quick_gelu, gelu, gelu_pytorch_tanh, silu)"
                ),
            )
        })
    }

    /// `eos_token_id` may be one id or a list.
    fn int_list(&self, key: &str) -> Result<Vec<i64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Number(_)) => Ok(vec![self.int(key, None)?]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| self.err(key, format!("expected integers, found {v}")))
                })
                .collect(),
            Some(other) => {
                Err(self.err(key, format!("expected an integer or a list, found {other}")))
            }
        }
    }
}

pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|cause| Error::Json { path: path.to_path_buf(), cause })?;
    match value {
        Value::Object(map) => Ok(map),
        other => {
            Err(Error::config(path, "<root>", format!("expected a JSON object, found {other}")))
        }
    }
}

/// Qwen2-VL's vision tower (`vision_config` of a Qwen2-VL `config.json`, transformers'
/// `Qwen2VLVisionConfig`): a ViT over patches of `temporal_patch_size × patch_size²` pixels with
/// 2-D rotary positions, and a merger of `spatial_merge_size²` neighbouring patches into one
/// token of the language model's width.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VisionConfig {
    pub depth: i64,
    pub embed_dim: i64,
    /// The language model's width: the merger's output.
    pub hidden_size: i64,
    pub num_heads: i64,
    /// The MLP's width (Qwen2-VL: `mlp_ratio · embed_dim`; Qwen2.5-VL: `intermediate_size`).
    pub intermediate_size: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub temporal_patch_size: i64,
    pub spatial_merge_size: i64,
    pub hidden_act: Activation,
    pub rope_theta: f64,
    pub kind: Qwen2VisionKind,
}

/// Which generation of Qwen's ViT a tower is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Qwen2VisionKind {
    /// Qwen2-VL: LayerNorm, `fc1 → act → fc2`, every block attending over each whole image.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm, a SwiGLU MLP with biases, and window attention (windows of
    /// `window_size` pixels, whole merge blocks) in every block but `fullatt_block_indexes`.
    Qwen25Vl { window_size: i64, fullatt_block_indexes: Vec<i64> },
}

impl Qwen2VisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads
    }

    /// Inputs of one flattened patch: channels × temporal patch × patch².
    pub fn patch_len(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The `vision_config` of the Qwen2-VL `config.json` at `path`, with transformers' defaults
    /// (Qwen2-VL-7B's); errors name the file and the key.
    pub fn from_json(path: &Path) -> Result<Self> {
        let root = read_json_object(path)?;
        let top = Fields::new(path, "", &root);
        let vision = top
            .object("vision_config")?
            .ok_or_else(|| top.err("vision_config", "missing (required)"))?;
        parse_qwen_vision(&top, &Fields::new(path, "vision_config.", vision))
    }
}

/// The vision rotary's θ (`rope_parameters`, axial only).
fn parse_vision_rope(f: &Fields<'_>) -> Result<f64> {
    Ok(match f.object("rope_parameters")? {
        Some(rope) => {
            let r = Fields::new(f.file, &f.key("rope_parameters."), rope);
            let kind = r.string("rope_type", Some("axial"))?;
            if kind != "axial" {
                return Err(
                    r.err("rope_type", format!("`{kind}`: the vision tower's rotary is `axial`"))
                );
            }
            r.float("rope_theta", 10000.0)?
        }
        None => 10000.0,
    })
}

/// The vision tower of a Qwen2-VL (`model_type` `qwen2_vl`) or Qwen2.5-VL (`qwen2_5_vl`) config.
fn parse_qwen_vision(top: &Fields<'_>, vision: &Fields<'_>) -> Result<Qwen2VisionConfig> {
    match top.string("model_type", Some("qwen2_vl"))?.as_str() {
        "qwen2_vl" => parse_qwen2_vision(vision),
        "qwen2_5_vl" => parse_qwen25_vision(vision),
        other => Err(top.err("model_type", format!("`{other}` (expected qwen2_vl or qwen2_5_vl)"))),
    }
}

/// Qwen2VLVisionConfig with transformers' defaults.
fn parse_qwen2_vision(f: &Fields<'_>) -> Result<Qwen2VisionConfig> {
    let embed_dim = f.positive("embed_dim", Some(1280))?;
    let cfg = Qwen2VisionConfig {
        depth: f.positive("depth", Some(32))?,
        embed_dim,
        hidden_size: f.positive("hidden_size", Some(3584))?,
        num_heads: f.positive("num_heads", Some(16))?,
        intermediate_size: embed_dim * f.positive("mlp_ratio", Some(4))?,
        in_channels: f.positive("in_channels", Some(3))?,
        patch_size: f.positive("patch_size", Some(14))?,
        temporal_patch_size: f.positive("temporal_patch_size", Some(2))?,
        spatial_merge_size: f.positive("spatial_merge_size", Some(2))?,
        hidden_act: f.activation("hidden_act", "quick_gelu")?,
        rope_theta: parse_vision_rope(f)?,
        kind: Qwen2VisionKind::Qwen2Vl,
    };
    check_qwen_vision(f, cfg)
}

/// Qwen2_5_VLVisionConfig with transformers' defaults: `hidden_size` is the tower's width and
/// `out_hidden_size` the merger's output.
fn parse_qwen25_vision(f: &Fields<'_>) -> Result<Qwen2VisionConfig> {
    let depth = f.positive("depth", Some(32))?;
    let full = if f.has("fullatt_block_indexes") {
        f.int_list("fullatt_block_indexes")?
    } else {
        vec![7, 15, 23, 31]
    };
    if let Some(bad) = full.iter().find(|&&b| b < 0 || b >= depth) {
        return Err(f.err("fullatt_block_indexes", format!("{bad} is not a block of {depth}")));
    }
    let cfg = Qwen2VisionConfig {
        depth,
        embed_dim: f.positive("hidden_size", Some(3584))?,
        hidden_size: f.positive("out_hidden_size", Some(3584))?,
        num_heads: f.positive("num_heads", Some(16))?,
        intermediate_size: f.positive("intermediate_size", Some(3420))?,
        in_channels: f.positive("in_channels", Some(3))?,
        patch_size: f.positive("patch_size", Some(14))?,
        temporal_patch_size: f.positive("temporal_patch_size", Some(2))?,
        spatial_merge_size: f.positive("spatial_merge_size", Some(2))?,
        hidden_act: f.activation("hidden_act", "silu")?,
        rope_theta: parse_vision_rope(f)?,
        kind: Qwen2VisionKind::Qwen25Vl {
            window_size: f.positive("window_size", Some(112))?,
            fullatt_block_indexes: full,
        },
    };
    if let Qwen2VisionKind::Qwen25Vl { window_size, .. } = cfg.kind {
        let unit = cfg.patch_size * cfg.spatial_merge_size;
        if window_size % unit != 0 {
            return Err(f.err(
                "window_size",
                format!("{window_size} px is not whole merge blocks of {unit} px"),
            ));
        }
    }
    check_qwen_vision(f, cfg)
}

fn check_qwen_vision(f: &Fields<'_>, cfg: Qwen2VisionConfig) -> Result<Qwen2VisionConfig> {
    // The axial rotary splits each head into four quarters (h and w, cos and sin halves).
    if cfg.embed_dim % cfg.num_heads != 0 || cfg.head_dim() % 4 != 0 {
        return Err(f.err(
            "num_heads",
            format!(
                "{} heads of embed_dim {}: the head width must be a whole multiple of 4",
                cfg.num_heads, cfg.embed_dim
            ),
        ));
    }
    Ok(cfg)
}

/// A Qwen2-VL `config.json` (transformers' `Qwen2VLConfig`): the vision tower, the Qwen2
/// language model (a LLaMA decoder with a q/k/v bias and M-RoPE) and the special tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VlConfig {
    pub vision: Qwen2VisionConfig,
    pub text: LlamaConfig,
    /// The placeholder each merged image token takes in the prompt (`<|image_pad|>`).
    pub image_token_id: i64,
    pub video_token_id: i64,
    /// `<|vision_start|>` and `<|vision_end|>`, around each image's placeholders.
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
}

impl Qwen2VlConfig {
    /// Parses both layouts: transformers 5.x (`text_config`, `vision_config`) and the flat one
    /// Qwen released and transformers 4.x wrote (the language model's keys at the root, M-RoPE in
    /// `rope_scaling: {"type": "mrope", "mrope_section": …}`). Errors name the file and the key.
    pub fn from_json(path: &Path) -> Result<Self> {
        let root = read_json_object(path)?;
        let top = Fields::new(path, "", &root);
        let vision_map = top
            .object("vision_config")?
            .ok_or_else(|| top.err("vision_config", "missing (required)"))?;
        let vision = parse_qwen_vision(&top, &Fields::new(path, "vision_config.", vision_map))?;
        let text_fields = match top.object("text_config")? {
            Some(map) => Fields::new(path, "text_config.", map),
            None => Fields::new(path, "", &root),
        };
        let mut text = parse_qwen2_text(&text_fields)?;
        // transformers 5.x keeps tie_word_embeddings at the root; pre-v5 saves had it in
        // text_config, which `Qwen2VLConfig.__post_init__` forwards when the root says false.
        text.tie_word_embeddings = top.boolean("tie_word_embeddings", false)?
            || text_fields.boolean("tie_word_embeddings", false)?;
        if vision.hidden_size != text.hidden_size {
            return Err(top.err(
                "vision_config.hidden_size",
                format!(
                    "the merger's output width {} differs from the language model's hidden_size {}",
                    vision.hidden_size, text.hidden_size
                ),
            ));
        }
        Ok(Self {
            vision,
            text,
            image_token_id: top.int("image_token_id", Some(151655))?,
            video_token_id: top.int("video_token_id", Some(151656))?,
            vision_start_token_id: top.int("vision_start_token_id", Some(151652))?,
            vision_end_token_id: top.int("vision_end_token_id", Some(151653))?,
        })
    }
}

/// transformers' `Qwen2VLTextConfig` with its defaults (Qwen2-VL-72B's widths), as the decoder
/// config the LLaMA code runs: q/k/v carry a bias and o does not (`Qwen2VLAttention`), the MLP has
/// none, `head_dim = hidden_size / num_attention_heads` (a `head_dim` key is not read there), and
/// the rotary is M-RoPE with `mrope_section` (default `[16, 24, 24]`). Sliding-window attention
/// is refused: no released Qwen2-VL checkpoint turns it on and the decoder has no windowed mask.
fn parse_qwen2_text(f: &Fields<'_>) -> Result<LlamaConfig> {
    if f.boolean("use_sliding_window", false)? {
        return Err(f.err("use_sliding_window", "sliding-window attention is not supported"));
    }
    let hidden_act = f.activation("hidden_act", "silu")?;
    if hidden_act != Activation::Silu {
        return Err(f.err(
            "hidden_act",
            format!("Qwen2's MLP is SwiGLU; `{}` is not supported", hidden_act.name()),
        ));
    }
    let hidden_size = f.positive("hidden_size", Some(8192))?;
    let num_attention_heads = f.positive("num_attention_heads", Some(64))?;
    // transformers: 8 when the key is absent, num_attention_heads when it is null.
    let num_key_value_heads = if f.map.contains_key("num_key_value_heads") {
        f.positive("num_key_value_heads", Some(num_attention_heads))?
    } else {
        8
    };
    check_heads(f, hidden_size, num_attention_heads, num_key_value_heads, false)?;
    let head_dim = hidden_size / num_attention_heads;
    let (rope_theta, section) = parse_mrope(f, head_dim)?;
    let id_or = |key: &str, default: i64| -> Result<Option<i64>> {
        if f.map.contains_key(key) {
            f.opt_int(key)
        } else {
            Ok(Some(default))
        }
    };
    let eos_token_ids =
        if f.map.contains_key("eos_token_id") { f.int_list("eos_token_id")? } else { vec![151645] };
    Ok(LlamaConfig {
        vocab_size: f.positive("vocab_size", Some(152064))?,
        hidden_size,
        intermediate_size: f.positive("intermediate_size", Some(29568))?,
        num_hidden_layers: f.positive("num_hidden_layers", Some(80))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.float("rms_norm_eps", 1e-5)?,
        rope_theta,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: f.positive("max_position_embeddings", Some(32768))?,
        tie_word_embeddings: false,
        attention_bias: false,
        qkv_bias: true,
        mlp_bias: false,
        mrope_section: Some(section),
        bos_token_id: id_or("bos_token_id", 151643)?,
        eos_token_ids,
        pad_token_id: f.opt_int("pad_token_id")?,
    })
}

/// Qwen2-VL's rotary settings: `rope_parameters` (5.x) or `rope_scaling` (4.x, `type: mrope`,
/// which transformers reads as the default frequencies), `rope_theta` (default 10⁶) and
/// `mrope_section`, whose three runs must fill half a head.
fn parse_mrope(f: &Fields<'_>, head_dim: i64) -> Result<(f64, [i64; 3])> {
    let (params, key) = match f.object("rope_parameters")? {
        Some(p) => (Some(p), "rope_parameters"),
        None => (f.object("rope_scaling")?, "rope_scaling"),
    };
    let mut theta = f.float("rope_theta", 1_000_000.0)?;
    let mut section = [16, 24, 24];
    if let Some(p) = params {
        let sub = Fields { file: f.file, prefix: format!("{}{key}.", f.prefix), map: p };
        theta = sub.float("rope_theta", theta)?;
        let kind = if sub.has("rope_type") {
            sub.string("rope_type", None)?
        } else {
            sub.string("type", Some("default"))?
        };
        if kind != "default" && kind != "mrope" {
            return Err(sub.err(
                "rope_type",
                format!("unsupported RoPE type `{kind}` for Qwen2-VL (default, mrope)"),
            ));
        }
        if sub.has("mrope_section") {
            let runs = sub.int_list("mrope_section")?;
            section = <[i64; 3]>::try_from(runs.as_slice()).map_err(|_| {
                sub.err("mrope_section", format!("expected three run lengths, found {runs:?}"))
            })?;
        }
        if section.iter().any(|&r| r < 0) || section.iter().sum::<i64>() != head_dim / 2 {
            return Err(sub.err(
                "mrope_section",
                format!(
                    "{section:?} must be non-negative and sum to head_dim / 2 = {}",
                    head_dim / 2
                ),
            ));
        }
    } else if head_dim != 128 {
        return Err(f.err(
            "rope_parameters",
            format!(
                "missing, and the default mrope_section [16, 24, 24] does not fit head_dim {head_dim}"
            ),
        ));
    }
    if theta <= 0.0 {
        return Err(f.err("rope_theta", format!("must be positive, found {theta}")));
    }
    Ok((theta, section))
}

/// CLIPVisionConfig with transformers' defaults.
fn parse_clip_vision(f: &Fields<'_>) -> Result<ClipVisionConfig> {
    let cfg = ClipVisionConfig {
        hidden_size: f.positive("hidden_size", Some(768))?,
        intermediate_size: f.positive("intermediate_size", Some(3072))?,
        num_hidden_layers: f.positive("num_hidden_layers", Some(12))?,
        num_attention_heads: f.positive("num_attention_heads", Some(12))?,
        num_channels: f.positive("num_channels", Some(3))?,
        image_size: f.positive("image_size", Some(224))?,
        patch_size: f.positive("patch_size", Some(32))?,
        layer_norm_eps: f.float("layer_norm_eps", 1e-5)?,
        hidden_act: f.activation("hidden_act", "quick_gelu")?,
    };
    if cfg.hidden_size % cfg.num_attention_heads != 0 {
        return Err(f.err(
            "num_attention_heads",
            format!("{} does not divide hidden_size {}", cfg.num_attention_heads, cfg.hidden_size),
        ));
    }
    if cfg.image_size % cfg.patch_size != 0 {
        return Err(f.err(
            "patch_size",
            format!("{} does not divide image_size {}", cfg.patch_size, cfg.image_size),
        ));
    }
    Ok(cfg)
}

/// Attention heads that split the width (unless `head_dim` is given) and key/value heads that
/// split the query heads.
fn check_heads(
    f: &Fields<'_>,
    hidden: i64,
    heads: i64,
    kv_heads: i64,
    own_head_dim: bool,
) -> Result<()> {
    if hidden % heads != 0 && !own_head_dim {
        return Err(
            f.err("num_attention_heads", format!("{heads} does not divide hidden_size {hidden}"))
        );
    }
    if heads % kv_heads != 0 {
        return Err(f.err(
            "num_key_value_heads",
            format!("{kv_heads} does not divide num_attention_heads {heads}"),
        ));
    }
    Ok(())
}

/// LlamaConfig with transformers' defaults; accepts `rope_theta`/`rope_scaling` (4.x) and
/// `rope_parameters` (5.x).
fn parse_llama(f: &Fields<'_>) -> Result<LlamaConfig> {
    let hidden_size = f.positive("hidden_size", Some(4096))?;
    let num_attention_heads = f.positive("num_attention_heads", Some(32))?;
    let num_key_value_heads = f.positive("num_key_value_heads", Some(num_attention_heads))?;
    check_heads(f, hidden_size, num_attention_heads, num_key_value_heads, f.has("head_dim"))?;
    let head_dim = f.positive("head_dim", Some(hidden_size / num_attention_heads.max(1)))?;
    if head_dim % 2 != 0 {
        return Err(f.err("head_dim", format!("RoPE needs an even head_dim, found {head_dim}")));
    }
    let (rope_theta, rope_scaling) = parse_rope(f)?;
    let hidden_act = f.activation("hidden_act", "silu")?;
    if hidden_act != Activation::Silu {
        return Err(f.err(
            "hidden_act",
            format!("LLaMA's MLP is SwiGLU; `{}` is not supported", hidden_act.name()),
        ));
    }
    Ok(LlamaConfig {
        vocab_size: f.positive("vocab_size", Some(32000))?,
        hidden_size,
        intermediate_size: f.positive("intermediate_size", Some(11008))?,
        num_hidden_layers: f.positive("num_hidden_layers", Some(32))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.float("rms_norm_eps", 1e-6)?,
        rope_theta,
        rope_scaling,
        max_position_embeddings: f.positive("max_position_embeddings", Some(2048))?,
        tie_word_embeddings: f.boolean("tie_word_embeddings", false)?,
        attention_bias: f.boolean("attention_bias", false)?,
        qkv_bias: false,
        mlp_bias: f.boolean("mlp_bias", false)?,
        mrope_section: None,
        bos_token_id: f.opt_int("bos_token_id")?,
        eos_token_ids: f.int_list("eos_token_id")?,
        pad_token_id: f.opt_int("pad_token_id")?,
    })
}

fn parse_rope(f: &Fields<'_>) -> Result<(f64, RopeScaling)> {
    let (params, key) = match f.object("rope_parameters")? {
        Some(p) => (Some(p), "rope_parameters"),
        None => (f.object("rope_scaling")?, "rope_scaling"),
    };
    let mut theta = f.float("rope_theta", 10000.0)?;
    let mut scaling = RopeScaling::Default;
    if let Some(p) = params {
        let sub = Fields { file: f.file, prefix: format!("{}{key}.", f.prefix), map: p };
        theta = sub.float("rope_theta", theta)?;
        let kind = if sub.has("rope_type") {
            sub.string("rope_type", None)?
        } else {
            sub.string("type", Some("default"))?
        };
        scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: sub.float("factor", 1.0)? },
            other => {
                return Err(sub.err(
                    "rope_type",
                    format!("unsupported RoPE type `{other}` (default, linear)"),
                ))
            }
        };
    }
    if theta <= 0.0 {
        return Err(f.err("rope_theta", format!("must be positive, found {theta}")));
    }
    Ok((theta, scaling))
}

fn check_select_layer(f: &Fields<'_>, key: &str, layer: i64, n: i64) -> Result<()> {
    if layer < -(n + 1) || layer > n {
        return Err(f.err(
            key,
            format!("{layer} is outside the vision tower's {n} layers (valid: -{} ..= {n})", n + 1),
        ));
    }
    Ok(())
}

impl LlavaConfig {
    /// Parses a llava-hf `config.json` (with `vision_config` and `text_config`).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let root = read_json_object(path)?;
        Self::from_hf_map(path, &root)
    }

    pub(crate) fn from_hf_map(path: &Path, root: &Map<String, Value>) -> Result<Self> {
        let f = Fields::new(path, "", root);
        let vision_map = f
            .object("vision_config")?
            .ok_or_else(|| f.err("vision_config", "missing (required)"))?;
        let text_map =
            f.object("text_config")?.ok_or_else(|| f.err("text_config", "missing (required)"))?;
        let vision = parse_clip_vision(&Fields::new(path, "vision_config.", vision_map))?;
        let text_fields = Fields::new(path, "text_config.", text_map);
        let mut text = parse_llama(&text_fields)?;
        // transformers ≥ 4.4x keeps tie_word_embeddings at the top level of LlavaConfig.
        if f.has("tie_word_embeddings") {
            text.tie_word_embeddings = f.boolean("tie_word_embeddings", false)?;
        }
        let vision_feature_layer = f.int("vision_feature_layer", Some(-2))?;
        check_select_layer(
            &f,
            "vision_feature_layer",
            vision_feature_layer,
            vision.num_hidden_layers,
        )?;
        let select_feature =
            match f.string("vision_feature_select_strategy", Some("default"))?.as_str() {
                "default" => SelectFeature::Default,
                "full" => SelectFeature::Full,
                other => {
                    return Err(f.err(
                        "vision_feature_select_strategy",
                        format!("unknown strategy `{other}` (default, full)"),
                    ))
                }
            };
        let image_token_id =
            f.int("image_token_index", Some(32000)).or_else(|_| f.int("image_token_id", None))?;
        if image_token_id < 0 || image_token_id >= text.vocab_size {
            return Err(f.err(
                "image_token_index",
                format!("{image_token_id} is outside the vocabulary of {}", text.vocab_size),
            ));
        }
        Ok(LlavaConfig {
            format: CheckpointFormat::LlavaHf,
            vision,
            text,
            projector: ProjectorKind::Mlp2xGelu,
            projector_act: f.activation("projector_hidden_act", "gelu")?,
            projector_bias: f.boolean("multimodal_projector_bias", true)?,
            image_token_id: Some(image_token_id),
            vision_feature_layer,
            select_feature,
            use_im_start_end: false,
            clip_source: None,
        })
    }

    /// Parses an original LLaVA `config.json` plus the CLIP directory's `config.json`.
    pub fn from_original_json(path: &Path, clip_config: &Path) -> Result<Self> {
        let root = read_json_object(path)?;
        let f = Fields::new(path, "", &root);
        let text = parse_llama(&f)?;
        let clip_root = read_json_object(clip_config)?;
        let clip_fields = Fields::new(clip_config, "", &clip_root);
        // A CLIPModel directory nests the vision part; a CLIPVisionModel directory does not.
        let vision = match clip_fields.object("vision_config")? {
            Some(v) => parse_clip_vision(&Fields::new(clip_config, "vision_config.", v))?,
            None => parse_clip_vision(&clip_fields)?,
        };
        let mm_hidden = f.positive("mm_hidden_size", Some(vision.hidden_size))?;
        if mm_hidden != vision.hidden_size {
            return Err(f.err(
                "mm_hidden_size",
                format!(
                    "{mm_hidden} differs from the CLIP tower's hidden_size {} ({})",
                    vision.hidden_size,
                    clip_config.display()
                ),
            ));
        }
        let projector = match f.string("mm_projector_type", Some("linear"))?.as_str() {
            "linear" => ProjectorKind::Linear,
            "mlp2x_gelu" => ProjectorKind::Mlp2xGelu,
            other => {
                return Err(f.err(
                    "mm_projector_type",
                    format!("unsupported projector `{other}` (linear, mlp2x_gelu)"),
                ))
            }
        };
        let vision_feature_layer = f.int("mm_vision_select_layer", Some(-2))?;
        check_select_layer(
            &f,
            "mm_vision_select_layer",
            vision_feature_layer,
            vision.num_hidden_layers,
        )?;
        let select_feature = match f.string("mm_vision_select_feature", Some("patch"))?.as_str() {
            "patch" => SelectFeature::Default,
            "cls_patch" => SelectFeature::Full,
            other => {
                return Err(f.err(
                    "mm_vision_select_feature",
                    format!("unknown `{other}` (patch, cls_patch)"),
                ))
            }
        };
        Ok(LlavaConfig {
            format: CheckpointFormat::Original,
            vision,
            text,
            projector,
            projector_act: Activation::Gelu,
            projector_bias: true,
            image_token_id: None,
            vision_feature_layer,
            select_feature,
            use_im_start_end: f.boolean("mm_use_im_start_end", false)?,
            clip_source: Some(f.string("mm_vision_tower", None)?),
        })
    }
}

/// Paths of a checkpoint directory's files.
#[derive(Clone, Debug)]
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub preprocessor: PathBuf,
}

impl CheckpointFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            tokenizer: dir.join("tokenizer.json"),
            preprocessor: dir.join("preprocessor_config.json"),
        }
    }
}

/// Whether `config.json` describes a llava-hf or an original LLaVA checkpoint.
pub fn detect_format(config: &Path) -> Result<CheckpointFormat> {
    let root = read_json_object(config)?;
    if let Some(kind) =
        root.get("model_type").and_then(Value::as_str).filter(|k| k.starts_with("qwen"))
    {
        return Err(Error::config(
            config,
            "model_type",
            format!(
                "`{kind}` is not a LLaVA checkpoint (Qwen2-VL loads as model::qwen2_vl::Qwen2Vl)"
            ),
        ));
    }
    if root.contains_key("vision_config") || root.contains_key("text_config") {
        Ok(CheckpointFormat::LlavaHf)
    } else if root.contains_key("mm_vision_tower") || root.contains_key("mm_hidden_size") {
        Ok(CheckpointFormat::Original)
    } else {
        Err(Error::config(
            config,
            "<root>",
            "neither a llava-hf config (vision_config/text_config) nor an original LLaVA config (mm_vision_tower)",
        ))
    }
}

/// Which model a checkpoint directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// llava-hf or original LLaVA ([`detect_format`] says which).
    Llava,
    /// Qwen2-VL or Qwen2.5-VL (`model_type` `qwen2_vl`, `qwen2_5_vl`).
    Qwen2Vl,
}

/// The family of the checkpoint whose `config.json` is `config`, from its `model_type`: `qwen2_vl`
/// is Qwen2-VL, other Qwen VLMs (2.5-VL, 3-VL) are an error naming what is missing, anything else
/// goes to the LLaVA loaders.
/// (Qwen2.5-VL shares Qwen2-VL's family: the same decoder and prompt; its tower is
/// [`Qwen2VisionKind::Qwen25Vl`].)
pub fn detect_family(config: &Path) -> Result<ModelFamily> {
    let root = read_json_object(config)?;
    match root.get("model_type").and_then(Value::as_str) {
        Some("qwen2_vl" | "qwen2_5_vl") => Ok(ModelFamily::Qwen2Vl),
        Some(kind) if kind.starts_with("qwen") => Err(Error::config(
            config,
            "model_type",
            format!(
                "`{kind}` is not supported (of the Qwen VLMs, qwen2_vl and qwen2_5_vl are, issue #22)"
            ),
        )),
        _ => Ok(ModelFamily::Llava),
    }
}
