"""Parity fixtures for the Rust Qwen2-VL vision tower: a tiny random Qwen2-VL checkpoint written by
HF transformers, and the tensors transformers computes for two images of different sizes (the
number of image tokens varies with the image in this family).

Run from the repository root with the project's environment:
    .venv/bin/python python/gen_qwen2vl_fixtures.py
Writes crates/core/tests/fixtures/qwen2vl/tiny/ (committed): the checkpoint (`config.json`,
`model.safetensors`, `preprocessor_config.json`), the two images (`image_0.png` 70×60,
`image_1.png` 130×90) and `expected.safetensors` with, per image `i`,
`pixel_values_i` (the image processor's `[patches, 3·2·14·14]`), `grid_thw_i` (`[1, 3]`),
`vision_hidden_i` (the last block's output, before the merger, `[patches, embed_dim]`) and
`merged_i` (the patch merger's output, `[patches / 4, hidden_size]`); and both images at once
(`pixel_values_both`, `grid_thw_both`, `merged_both`: attention stays within each image); and
the M-RoPE positions transformers' `get_rope_index` gives a prompt holding both images
(`mrope_input_ids`, `mrope_positions` `[3, tokens]`, `mrope_delta`); the whole model's logits
(`lm_input_ids_both`, `lm_logits_both` `[tokens, vocab]`: a prompt with both images between
`<|vision_start|>`/`<|vision_end|>`; `lm_input_ids_text`, `lm_logits_text`: text only) and
greedy generation (`gen_input_ids` with image 1, `gen_tokens`: the new tokens `generate` returns,
eos included if it came); and a chat: a byte-level BPE tokenizer in Qwen2's form (trained here on
a few sentences to 300 entries, then Qwen's special tokens at 300-306: `<|image_pad|>`,
`<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`, `<|im_start|>`, `<|im_end|>`,
`<|endoftext|>`) saved with Qwen2-VL-Instruct's released chat template (`tokenizer.json`,
`tokenizer_config.json`, `chat_template.jinja`), the rendered chat (`expected.json`: `chat_text`,
`chat_answer`), its ids with the image placeholder expanded as `Qwen2VLProcessor` does
(`chat_input_ids`) and the greedy tokens (`chat_tokens`).
`VERSION` records the generator and the transformers/torch versions.

Also writes crates/core/tests/fixtures/qwen2vl/tiny_model_prefixed/: the same checkpoint with
its keys renamed to the layout transformers 4.52–4.57 wrote (`model.visual.*`,
`model.language_model.*`, `lm_head.*`). The installed transformers (5.x) writes Qwen's own layout
(`visual.*`, `model.*`), so this copy is renamed here rather than written by 4.5x itself.
"""

import copy
import json
import os

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

GENERATOR_VERSION = 3
OUT = os.path.join("crates", "core", "tests", "fixtures", "qwen2vl", "tiny")


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=48,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            hidden_act="quick_gelu",
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
    model = Qwen2VLForConditionalGeneration(config).eval()
    # Random init is small around zero; widen the norms' and biases' values so that a wrong
    # formula cannot hide under tiny activations.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.2)
        # The language model's random init gives near-uniform logits and a greedy run that
        # repeats one token; larger weights make the logits and the greedy tokens discriminate.
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("weight") and "norm" not in name:
                p.mul_(4.0)
            if "embed_tokens" in name or "lm_head" in name:
                p.mul_(7.5)
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    processor.save_pretrained(OUT)

    images = [
        Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)),
    ]
    for i, image in enumerate(images):
        image.save(os.path.join(OUT, f"image_{i}.png"))
    expected = {}
    meta = {"images": []}
    visual = model.model.visual
    with torch.no_grad():
        for i, image in enumerate(images):
            batch = processor(images=[image], return_tensors="pt")
            pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
            out = visual(pixels, grid_thw=grid)
            expected[f"pixel_values_{i}"] = pixels.contiguous()
            expected[f"grid_thw_{i}"] = grid.to(torch.int64).contiguous()
            expected[f"vision_hidden_{i}"] = out.last_hidden_state.contiguous()
            expected[f"merged_{i}"] = out.pooler_output.contiguous()
            meta["images"].append({"size": list(image.size), "grid_thw": grid[0].tolist()})
        both = processor(images=images, return_tensors="pt")
        out = visual(both["pixel_values"], grid_thw=both["image_grid_thw"])
        expected["pixel_values_both"] = both["pixel_values"].contiguous()
        expected["grid_thw_both"] = both["image_grid_thw"].to(torch.int64).contiguous()
        expected["merged_both"] = out.pooler_output.contiguous()
    # M-RoPE positions of a prompt with both images (text, image 0, text, image 1, text), from
    # transformers' own `get_rope_index`.
    merge = config.vision_config.spatial_merge_size
    tokens = [5, 6, 7]
    types = [0, 0, 0]
    for i, text in [(0, [8, 9]), (1, [10, 11, 12, 13])]:
        t, h, w = expected[f"grid_thw_{i}"][0].tolist()
        n = t * (h // merge) * (w // merge)
        tokens += [config.image_token_id] * n + text
        types += [1] * n + [0] * len(text)
    input_ids = torch.tensor([tokens])
    positions, delta = model.model.get_rope_index(
        input_ids, torch.tensor([types]), image_grid_thw=expected["grid_thw_both"]
    )
    expected["mrope_input_ids"] = input_ids.contiguous()
    expected["mrope_positions"] = positions[:, 0].contiguous()
    expected["mrope_delta"] = delta.reshape(1).contiguous()
    language_model_references(model, config, expected)
    chat_references(model, config, images[1], processor, expected, meta)
    bf16_references(model, config, expected)
    save_file(expected, os.path.join(OUT, "expected.safetensors"))
    write_model_prefixed_copy()
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(OUT, "..", "VERSION"), "w") as f:
        f.write(
            f"generator {GENERATOR_VERSION}\ntransformers {transformers.__version__}\ntorch {torch.__version__}\n"
        )
    print(json.dumps(meta))


def bf16_references(model, config, expected):
    """transformers' own bf16 run of the same weights, on a copy (the saved f32 model and every
    other reference stay as they are): the logits of the prompt with both images
    (`lm_logits_both_bf16`). Also used by gen_qwen2_5_vl_fixtures.py."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    input_ids = expected["lm_input_ids_both"]
    types = (input_ids == config.image_token_id).to(torch.int32)
    with torch.no_grad():
        logits = bf16(
            input_ids=input_ids, pixel_values=expected["pixel_values_both"].to(torch.bfloat16),
            image_grid_thw=expected["grid_thw_both"], mm_token_type_ids=types,
        ).logits
    expected["lm_logits_both_bf16"] = logits[0].float().contiguous()


def language_model_references(model, config, expected):
    """Logits of the whole model (vision tower, image tokens at their placeholders, M-RoPE, the
    Qwen2 decoder) and greedy tokens, as transformers computes them."""
    merge = config.vision_config.spatial_merge_size

    def image_run(i):
        t, h, w = expected[f"grid_thw_{i}"][0].tolist()
        n = t * (h // merge) * (w // merge)
        return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]

    def run(ids, pixels, grid):
        input_ids = torch.tensor([ids])
        kwargs = {}
        if pixels is not None:
            types = (input_ids == config.image_token_id).to(torch.int32)
            kwargs = dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types)
        return input_ids, kwargs

    with torch.no_grad():
        ids = [5, 6] + image_run(0) + [8, 9] + image_run(1) + [10, 11, 12, 13]
        input_ids, kwargs = run(ids, expected["pixel_values_both"], expected["grid_thw_both"])
        logits = model(input_ids=input_ids, **kwargs).logits
        expected["lm_input_ids_both"] = input_ids.contiguous()
        expected["lm_logits_both"] = logits[0].contiguous()
        ids = [5, 6, 7, 8, 9, 10, 11]
        input_ids, kwargs = run(ids, None, None)
        expected["lm_input_ids_text"] = input_ids.contiguous()
        expected["lm_logits_text"] = model(input_ids=input_ids).logits[0].contiguous()
        ids = [5, 6] + image_run(1) + [7, 8]
        input_ids, kwargs = run(ids, expected["pixel_values_1"], expected["grid_thw_1"])
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8,
            do_sample=False, eos_token_id=config.text_config.eos_token_id, pad_token_id=0, **kwargs
        )
        expected["gen_input_ids"] = input_ids.contiguous()
        expected["gen_tokens"] = out[0, input_ids.shape[1]:].contiguous()


# Qwen2-VL-Instruct's chat template as Qwen released it (chat_template.json of
# Qwen/Qwen2-VL-7B-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = [
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
]


def chat_references(model, config, image, processor, expected, meta, out=OUT):
    """A Qwen2-style tokenizer with the released chat template (saved in `out`), one chat turn
    about an image rendered, tokenized, expanded and answered greedily. Also used by
    gen_qwen2_5_vl_fixtures.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "What color is the shape? The shape is red. Is there a circle in the image? Yes, there "
        "is a blue circle.",
        "Describe this image. A green triangle on a white background. How many shapes are there?",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() == 300, tok.get_vocab_size()
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    ids = [tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids[:4] == [config.image_token_id, config.video_token_id,
                       config.vision_start_token_id, config.vision_end_token_id], ids
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    fast.save_pretrained(out)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    text = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = processor(images=[image], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    merge = config.vision_config.spatial_merge_size
    # Qwen2VLProcessor.replace_image_token: each <|image_pad|> becomes one per merged token.
    n = int(grid[0].prod()) // merge**2
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
    input_ids = torch.tensor([fast(expanded)["input_ids"]])
    types = (input_ids == config.image_token_id).to(torch.int32)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=pixels["pixel_values"], image_grid_thw=grid, mm_token_type_ids=types,
            max_new_tokens=8, do_sample=False, eos_token_id=config.text_config.eos_token_id,
            pad_token_id=tok.token_to_id("<|endoftext|>"),
        )
    new = out[0, input_ids.shape[1]:]
    expected["chat_input_ids"] = input_ids.contiguous()
    expected["chat_tokens"] = new.contiguous()
    meta["chat_prompt"] = "What color is the shape?"
    meta["chat_image"] = "image_1.png"
    meta["chat_text"] = text
    meta["chat_answer"] = fast.decode(new, skip_special_tokens=True)


def write_model_prefixed_copy():
    from safetensors.torch import load_file

    out = os.path.join(os.path.dirname(OUT), "tiny_model_prefixed")
    os.makedirs(out, exist_ok=True)
    tensors = load_file(os.path.join(OUT, "model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
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
