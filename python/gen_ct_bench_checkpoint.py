"""A larger compressed-tensors LLaVA checkpoint written by the compressed-tensors library itself (as
llm-compressor writes one), for timing another tool's checkpoint in `experiments bench`
(`[[checkpoint]]`): random weights, W4A16 (int4 symmetric, groups of 128, pack-quantized) or
W8A8 (int8 per channel, int8 static per-tensor input scales, int-quantized) on every
language-model linear; vision tower, projector and lm_head dense. Speed and bytes do not depend
on the weights' values, so nothing is calibrated beyond min-max.

Run from the repository root with the project's environment:
    .venv/bin/python python/gen_ct_bench_checkpoint.py OUT_DIR [--scheme w4a16|w8a8] [--size 1b|tiny]
`1b`: LLaMA hidden 2048, intermediate 5504, 16 layers, 16 heads, vocab 32000 (0.86B decoder
parameters, 0.52 GB of int4 codes and scales), CLIP ViT-B/16-sized tower at 224 px; written in
bf16. Takes about 2 minutes and 4 GB of memory on the 2-core machine. Not committed (large).
"""

import argparse
import os
import sys

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_ct_fixtures import calibrate  # noqa: E402

SIZES = {
    "1b": dict(text=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000),
               vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16)),
    "tiny": dict(text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=320),
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=14)),
}
IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def scheme_of(name):
    w = lambda **k: QuantizationArgs(num_bits=k.pop("bits"), type="int", **k)  # noqa: E731
    if name == "w4a16":
        return QuantizationScheme(targets=["Linear"], weights=w(bits=4, symmetric=True, strategy="group", group_size=128))
    return QuantizationScheme(targets=["Linear"], weights=w(bits=8, symmetric=True, strategy="channel"),
                              input_activations=w(bits=8, symmetric=True, strategy="tensor"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--scheme", choices=["w4a16", "w8a8"], default="w4a16")
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    args = ap.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists")
    torch.manual_seed(0)
    size = SIZES[args.size]
    n_img = (size["vision"]["image_size"] // size["vision"]["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(projection_dim=size["vision"]["hidden_size"], **size["vision"]),
        text_config=LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **size["text"]),
        image_token_index=size["text"]["vocab_size"] - 1, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=n_img, tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    scheme = scheme_of(args.scheme)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORE))
    calibrate(model)  # min-max weight qparams, as the import fixtures
    for _, m in model.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is not None and s.input_activations is not None:
            # A stand-in calibrated range: activations of about unit size.
            m.input_scale.data.fill_(4.0 / 127.5)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(args.out)
    comp.update_config(args.out)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({total / 1e9:.2f} GB, {args.scheme}, {args.size})")


if __name__ == "__main__":
    main()
