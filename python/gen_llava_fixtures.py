"""Parity fixtures for the Rust LLaVA: tiny random checkpoints written by HF transformers, with the
tensors transformers computes for them (the reference implementation of LLaVA, CLIP and LLaMA).

Run from the repository root with the project's environment (`make fixtures`):
    .venv/bin/python python/gen_llava_fixtures.py
Writes crates/core/tests/fixtures/llava/. The fixtures are committed; `VERSION` records the
generator version and the transformers/torch versions that produced them, and the Rust tests
check it.

Configurations (each a checkpoint directory plus `expected.safetensors` and `expected.json`):
  hf_mha_mlp        the full llava_v1 prompt; MHA, mlp2x_gelu, vision_feature_layer -2, `default` select, the key layout
                    transformers 5.x writes (`vision_tower.*` without `vision_model`), rope_parameters
  hf_gqa_full       also bf16 logits; GQA (4 q / 2 kv heads), layer -1, `full` select, tied embeddings, gelu CLIP,
                    rope_theta 500000, the transformers 4.x layout (`vision_tower.vision_model.*`,
                    `language_model.model.*`), 4.x config style (`rope_theta` at the top level)
  hf_prefixed_sharded  GQA, positive select layer 1, the ≥4.52 layout (`model.language_model.*`,
                    `model.vision_tower.vision_model.*`, `lm_head.*`) sharded in two files + index
  original_linear   original LLaVA (liuhaotian) layout with a `linear` projector and the CLIP weights
                    in a separate full-CLIPModel directory (text tower included); the reference
                    is transformers' CLIP + LLaMA with a single-Linear projector, as LLaVA-v1.3.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors, AddedToken
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

GENERATOR_VERSION = 1
OUT = os.path.join("crates", "core", "tests", "fixtures", "llava")

CORPUS = [
    "What color is the shape in the image?",
    "Is there a red circle in the image?",
    "Is there not a blue triangle?",
    "What shape is in the image?",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: ASSISTANT: yes no circle rectangle triangle red green blue black gray teal brown yellow",
    "Describe the picture. The answer is A. Context: N/A Options: (A) cat (B) dog",
]

PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat color is the "
    "shape? ASSISTANT:"
)
SHORT_PROMPT = "USER: <image>\nWhat color is the shape? ASSISTANT:"
IMAGE_TOKEN = "<image>"


def build_tokenizer(path):
    """A small LLaMA-like tokenizer: SentencePiece-style Metaspace BPE (byte fallback enabled but no
    byte tokens, to keep the vocabulary small), BOS added
    by the post-processor, `<image>` as an added special token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(path)
    return tok


def make_images(dirpath):
    rng = np.random.default_rng(0)
    h, w = 30, 40
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 6, yy * 8, (xx + yy) * 3], -1) + rng.integers(0, 40, (h, w, 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(os.path.join(dirpath, "image_rgb.png"))
    gray = rng.integers(0, 256, (37, 23), dtype=np.uint8)
    Image.fromarray(gray, "L").save(os.path.join(dirpath, "image_gray.png"))
    rgba = np.concatenate([rgb[:, :20], rng.integers(0, 256, (h, 20, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(dirpath, "image_rgba.png"))
    Image.fromarray(rgb, "RGB").save(os.path.join(dirpath, "image_rgb.jpg"), quality=90)


def expand2square(pil_img, background_color):
    """LLaVA-1.5's pad-to-square (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def image_fixtures(dirpath, size):
    """Pixel values from transformers' PIL CLIPImageProcessor for every fixture image."""
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc.save_pretrained(dirpath)
    out = {}
    for name in ["image_rgb.png", "image_gray.png", "image_rgba.png", "image_rgb.jpg"]:
        img = Image.open(os.path.join(dirpath, name)).convert("RGB")
        key = name.replace(".", "_")
        out[f"pixels_{key}"] = proc(images=img, return_tensors="pt")["pixel_values"][0]
        fill = tuple(int(x * 255) for x in proc.image_mean)
        out[f"pixels_pad_{key}"] = proc(images=expand2square(img, fill), return_tensors="pt")["pixel_values"][0]
    return proc, out


def tiny_config(tok, *, heads, kv_heads, layer, strategy, vision_act, tie, rope_theta, vision_layers=3):
    vocab = tok.get_vocab_size()
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16, hidden_act=vision_act,
    )
    tc = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=rope_theta, tie_word_embeddings=tie,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"), max_position_embeddings=512,
    )
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=tok.token_to_id(IMAGE_TOKEN),
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, tie_word_embeddings=tie,
        image_seq_length=16 if strategy == "default" else 17,
    )


def randomize(model, seed):
    """Random weights with more spread than the default init, so errors are visible in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def reference_outputs(model, cfg, input_ids, pixel_values, eos_id):
    """The tensors transformers computes: selected vision hidden state, projector output, logits,
    greedy tokens."""
    model.eval()
    with torch.no_grad():
        vt = model.model.vision_tower(pixel_values, output_hidden_states=True)
        hidden = vt.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        projected = model.model.multi_modal_projector(hidden)
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]
        gen = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False,
            eos_token_id=eos_id, pad_token_id=eos_id,
        )[0, input_ids.shape[1]:]
    return hidden[0], projected[0], logits, gen


def expand_image_tokens(ids, image_id, n):
    out = []
    for t in ids:
        out.extend([image_id] * n if t == image_id else [t])
    return torch.tensor([out])


def rename_keys(state, mapping):
    out = {}
    for k, v in state.items():
        for src, dst in mapping:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out[k] = v.contiguous()
    return out


def hf_state(model):
    """Canonical module names of transformers' LlavaForConditionalGeneration."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


LAYOUTS = {
    # transformers 5.x save_pretrained
    "flat_vision": [
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ],
    "legacy": [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ],
    "prefixed": [
        ("model.vision_tower.", "model.vision_tower.vision_model."),
    ],
}


def write_hf_checkpoint(dirpath, model, cfg, layout, shards=1, config_style="v5"):
    state = hf_state(model)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # transformers keeps CLIP's vision model flat under model.vision_tower in memory
    state = rename_keys(state, LAYOUTS[layout])
    keys = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(dirpath, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = (len(keys) + shards - 1) // shards
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
            save_file(part, os.path.join(dirpath, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        with open(os.path.join(dirpath, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
    cfg_dict = cfg.to_dict()
    if config_style == "v4":
        tc = cfg_dict["text_config"]
        params = tc.pop("rope_parameters", None) or {}
        tc["rope_theta"] = params.get("rope_theta", 10000.0)
        tc["rope_scaling"] = None
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)


def write_original_checkpoint(dirpath, model, cfg, tok):
    """liuhaotian/LLaVA layout: LLaMA keys under model.*, projector model.mm_projector.*, and a
    separate CLIP directory (`clip/`) holding a full CLIPModel state (vision + text towers)."""
    state = hf_state(model)
    llm = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            llm["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            llm[k] = v
    llm["model.mm_projector.weight"] = model.linear_projector.weight.detach().clone()
    llm["model.mm_projector.bias"] = model.linear_projector.bias.detach().clone()
    # A derived buffer old LLaMA checkpoints carry; the loader ignores it by name.
    llm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file({k: v.contiguous() for k, v in llm.items()}, os.path.join(dirpath, "model.safetensors"))
    clip_dir = os.path.join(dirpath, "clip")
    os.makedirs(clip_dir, exist_ok=True)
    clip = {"vision_model." + k[len("model.vision_tower."):]: v for k, v in state.items() if k.startswith("model.vision_tower.")}
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    clip["text_projection.weight"] = torch.zeros(4, 8)
    clip["visual_projection.weight"] = torch.zeros(4, 32)
    clip["logit_scale"] = torch.zeros(())
    save_file({k: v.contiguous() for k, v in clip.items()}, os.path.join(clip_dir, "model.safetensors"))
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
        json.dump({"model_type": "clip", "vision_config": cfg.vision_config.to_dict(), "text_config": {}}, f, indent=2)
    tc = cfg.text_config
    original = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "vocab_size": tc.vocab_size,
        "rms_norm_eps": tc.rms_norm_eps, "max_position_embeddings": tc.max_position_embeddings,
        "bos_token_id": tc.bos_token_id, "eos_token_id": tc.eos_token_id, "pad_token_id": 0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_vision_select_layer": cfg.vision_feature_layer, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(original, f, indent=2, sort_keys=True)


def tokenizer_image_token(prompt, tok, image_index=-200):
    """LLaVA's mm_utils.tokenizer_image_token (chunks tokenized separately, BOS kept once)."""
    chunks = [tok.encode(c).ids for c in prompt.split(IMAGE_TOKEN)]
    bos = tok.token_to_id("<s>")
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == bos:
        offset = 1
        input_ids.append(chunks[0][0])
    sep = [image_index] * (offset + 1)
    merged = [e for sub in zip(chunks, [sep] * len(chunks)) for e in sub][:-1]
    for x in merged:
        input_ids.extend(x[offset:])
    return input_ids


def main():
    torch.manual_seed(0)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tok_path = os.path.join(OUT, "tokenizer.json")
    tok = build_tokenizer(tok_path)
    make_images(OUT)
    proc, pixels = image_fixtures(OUT, 32)
    save_file({k: v.contiguous() for k, v in pixels.items()}, os.path.join(OUT, "pixels.safetensors"))
    pixel_values = pixels["pixels_image_rgb_png"].unsqueeze(0)
    eos = tok.token_to_id("</s>")
    image_id = tok.token_to_id(IMAGE_TOKEN)

    specs = [
        ("hf_mha_mlp", dict(heads=4, kv_heads=4, layer=-2, strategy="default", vision_act="quick_gelu", tie=False, rope_theta=10000.0), "flat_vision", 1, "v5"),
        ("hf_gqa_full", dict(heads=4, kv_heads=2, layer=-1, strategy="full", vision_act="gelu", tie=True, rope_theta=500000.0), "legacy", 1, "v4"),
        ("hf_prefixed_sharded", dict(heads=4, kv_heads=2, layer=1, strategy="default", vision_act="quick_gelu", tie=False, rope_theta=10000.0), "prefixed", 2, "v5"),
    ]
    summary = {}
    for seed, (name, kw, layout, shards, style) in enumerate(specs):
        d = os.path.join(OUT, name)
        os.makedirs(d)
        cfg = tiny_config(tok, **kw)
        model = LlavaForConditionalGeneration(cfg)
        randomize(model, seed + 1)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        write_hf_checkpoint(d, model, cfg, layout, shards, style)
        shutil.copy(tok_path, d)
        proc.save_pretrained(d)
        prompt = PROMPT if name == "hf_mha_mlp" else SHORT_PROMPT
        ids = tok.encode(prompt).ids
        n_feat = cfg.image_seq_length
        full_ids = expand_image_tokens(ids, image_id, n_feat)
        hidden, projected, logits, gen = reference_outputs(model, cfg, full_ids, pixel_values, eos)
        tensors = {"vision_hidden": hidden, "projected": projected, "logits": logits}
        # bf16: transformers' own bf16 run of the same weights.
        if name == "hf_gqa_full":
            mb = model.to(torch.bfloat16)
            with torch.no_grad():
                tensors["logits_bf16"] = mb(input_ids=full_ids, pixel_values=pixel_values.to(torch.bfloat16)).logits[0].float()
            model = model.float()
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, os.path.join(d, "expected.safetensors"))
        meta = {"prompt": prompt, "input_ids": ids, "generated": gen.tolist(), "image": "image_rgb.png", "max_new_tokens": 8}
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(meta, f, indent=1)
        summary[name] = {"generated": gen.tolist()}

    # Original LLaVA with a single-Linear projector (LLaVA-v1.3).
    name = "original_linear"
    d = os.path.join(OUT, name)
    os.makedirs(d)
    cfg = tiny_config(tok, heads=4, kv_heads=4, layer=-2, strategy="default", vision_act="quick_gelu", tie=False, rope_theta=10000.0)
    model = LlavaForConditionalGeneration(cfg)
    randomize(model, 7)
    linear = torch.nn.Linear(cfg.vision_config.hidden_size, cfg.text_config.hidden_size)
    with torch.no_grad():
        linear.weight.copy_(0.2 * torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(8)))
        linear.bias.copy_(0.2 * torch.randn(linear.bias.shape, generator=torch.Generator().manual_seed(9)))
    model.linear_projector = linear
    model.model.multi_modal_projector.forward = lambda x: linear(x)
    write_original_checkpoint(d, model, cfg, tok)
    shutil.copy(tok_path, d)
    proc.save_pretrained(d)
    ids = tokenizer_image_token(SHORT_PROMPT, tok)
    full_ids = expand_image_tokens([image_id if t == -200 else t for t in ids], image_id, 16)
    hidden, projected, logits, gen = reference_outputs(model, cfg, full_ids, pixel_values, eos)
    save_file({"vision_hidden": hidden.contiguous(), "projected": projected.contiguous(), "logits": logits.contiguous()}, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"prompt": SHORT_PROMPT, "input_ids": ids, "generated": gen.tolist(), "image": "image_rgb.png", "max_new_tokens": 8}, f, indent=1)

    with open(os.path.join(OUT, "VERSION"), "w") as f:
        f.write(f"generator {GENERATOR_VERSION}\ntransformers {transformers.__version__}\ntorch {torch.__version__.split('+')[0]}\n")
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
