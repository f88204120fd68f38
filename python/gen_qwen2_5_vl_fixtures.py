"""Parity fixtures for the Rust Qwen2.5-VL model: a tiny random Qwen2.5-VL checkpoint written by
HF transformers and what transformers computes on the two images of the Qwen2-VL fixtures
(70x60 and 130x90 px: 4x4 and 6x10 patches).

Run from the repository root with the project's environment (after gen_qwen2vl_fixtures.py,
whose images it reads):
    .venv/bin/python python/gen_qwen2_5_vl_fixtures.py
Writes crates/core/tests/fixtures/qwen2_5_vl/tiny/ (committed): the checkpoint (`config.json`,
`model.safetensors`, `preprocessor_config.json`) and `expected.safetensors` with
`pixel_values_both`, `grid_thw_both`, `vision_hidden_both` (the last block's output put back in
the image processor's patch order: transformers returns it in window order), `merged_both` (the
merger's tokens, which transformers puts back in order itself), the whole model's logits for a
prompt with both images (`lm_input_ids_both`, `lm_logits_both`) and greedy tokens with image 1
(`gen_input_ids`, `gen_tokens`); a chat turn about image 1 with the Qwen2-style tokenizer and the
Qwen2-VL-Instruct chat template of gen_qwen2vl_fixtures.py (`tokenizer.json`,
`tokenizer_config.json`, `chat_template.jinja`, `expected.json`: `chat_text`, `chat_answer`;
`chat_input_ids`, `chat_tokens`). Also `tiny_model_prefixed/`: the same weights in transformers
4.52-4.57's key layout. `VERSION` records the generator and the transformers/torch versions.

The tiny tower has two blocks, the second with full attention (`fullatt_block_indexes = [1]`) and
the first with window attention over windows of 56 px (2x2 merged tokens): the larger image's
3x5 merged grid splits into ragged windows.
"""

import json
import os

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

from gen_qwen2vl_fixtures import bf16_references, chat_references

GENERATOR_VERSION = 3
ROOT = os.path.join("crates", "core", "tests", "fixtures")
OUT = os.path.join(ROOT, "qwen2_5_vl", "tiny")
IMAGES = os.path.join(ROOT, "qwen2vl", "tiny")


def main():
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=48,
            intermediate_size=48,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            hidden_act="silu",
        ),
        text_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=320,
            bos_token_id=306,
            eos_token_id=305,
            max_position_embeddings=512,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 1, 3]),
        ),
        image_token_id=300,
        video_token_id=301,
        vision_start_token_id=302,
        vision_end_token_id=303,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.2)
        # As in the Qwen2-VL fixtures: larger language-model weights so that greedy tokens
        # discriminate.
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("weight") and "norm" not in name:
                p.mul_(4.0)
            if "embed_tokens" in name or "lm_head" in name:
                p.mul_(7.5)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    processor.save_pretrained(OUT)

    images = [Image.open(os.path.join(IMAGES, f"image_{i}.png")).convert("RGB") for i in range(2)]
    expected = {}
    merge = config.vision_config.spatial_merge_size
    with torch.no_grad():
        both = processor(images=images, return_tensors="pt")
        pixels, grid = both["pixel_values"], both["image_grid_thw"]
        out = model.model.visual(pixels, grid_thw=grid)
        window_index, _ = get_vision_window_index(
            grid, merge, config.vision_config.window_size, config.vision_config.patch_size
        )
        hidden = out.last_hidden_state
        units = hidden.reshape(-1, merge * merge, hidden.shape[-1])
        in_order = units[torch.argsort(window_index)].reshape(hidden.shape)
        expected["pixel_values_both"] = pixels.contiguous()
        expected["grid_thw_both"] = grid.to(torch.int64).contiguous()
        expected["vision_hidden_both"] = in_order.contiguous()
        expected["merged_both"] = out.pooler_output.contiguous()

        def image_run(i):
            t, h, w = grid[i].tolist()
            n = t * (h // merge) * (w // merge)
            return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]

        ids = [5, 6] + image_run(0) + [8, 9] + image_run(1) + [10, 11, 12, 13]
        input_ids = torch.tensor([ids])
        types = (input_ids == config.image_token_id).to(torch.int32)
        logits = model(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grid,
                       mm_token_type_ids=types).logits
        expected["lm_input_ids_both"] = input_ids.contiguous()
        expected["lm_logits_both"] = logits[0].contiguous()

        one = processor(images=[images[1]], return_tensors="pt")
        ids = [5, 6] + image_run(1) + [7, 8]
        input_ids = torch.tensor([ids])
        types = (input_ids == config.image_token_id).to(torch.int32)
        gen = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=one["pixel_values"], image_grid_thw=one["image_grid_thw"],
            mm_token_type_ids=types, max_new_tokens=8, do_sample=False,
            eos_token_id=config.text_config.eos_token_id, pad_token_id=0,
        )
        expected["gen_input_ids"] = input_ids.contiguous()
        expected["gen_tokens"] = gen[0, input_ids.shape[1]:].contiguous()
    meta = {}
    chat_references(model, config, images[1], processor, expected, meta, out=OUT)
    bf16_references(model, config, expected)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    save_file(expected, os.path.join(OUT, "expected.safetensors"))
    write_model_prefixed_copy()
    with open(os.path.join(OUT, "..", "VERSION"), "w") as f:
        f.write(
            f"generator {GENERATOR_VERSION}\ntransformers {transformers.__version__}\ntorch {torch.__version__}\n"
        )
    print({k: tuple(v.shape) for k, v in expected.items()}, expected["gen_tokens"].tolist())


def write_model_prefixed_copy():
    out = os.path.join(os.path.dirname(OUT), "tiny_model_prefixed")
    os.makedirs(out, exist_ok=True)
    renamed = {}
    for key, value in load_file(os.path.join(OUT, "model.safetensors")).items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        renamed[key] = value
    save_file(renamed, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for name in ["config.json", "preprocessor_config.json"]:
        with open(os.path.join(OUT, name)) as src, open(os.path.join(out, name), "w") as dst:
            dst.write(src.read())


if __name__ == "__main__":
    main()
