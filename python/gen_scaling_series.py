"""The scaling series of issue #21: llava-hf checkpoints with random weights, written by transformers,
at sizes from the embedded tiny LLaVA's shapes (1.6M parameters, 64 image tokens) toward LLaVA-1.5's
(576 image tokens), for measuring what each search strategy costs as the model grows. Search cost
and memory do not depend on the weights' values, only on shapes.

Run from the repository root with the project's environment (`make scaling` runs it):
    .venv/bin/python python/gen_scaling_series.py [--sizes s0,s1,...] [--out models/scaling]
Each size is a directory `<out>/<size>/` (config.json, model.safetensors in f32, tokenizer.json and
preprocessor_config.json copied from models/tiny-llava so easy-VQA prompts tokenize as for the tiny
model) plus `scaling.json`: the shapes and parameter counts the cost model reads. The checkpoints
are not committed (s4 is ~2 GB); a size already written with the same shapes is kept.
"""

import argparse
import json
import os
import shutil

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

TINY = os.path.join("models", "tiny-llava")

# name: (language hidden, layers, intermediate, heads, kv heads,
#        vision hidden, layers, intermediate, heads, image size, patch size)
# s0 is the embedded tiny LLaVA's shape; widths roughly double, depths grow toward LLaVA-1.5-7B
# (language 4096 x 32, intermediate 11008; CLIP ViT-L/14-336: 1024 x 24, 576 image tokens).
SIZES = {
    "s0": (192, 4, 384, 8, 4, 64, 4, 256, 4, 64, 8),
    "s1": (384, 6, 1024, 8, 8, 128, 6, 512, 4, 96, 8),
    "s2": (768, 8, 2048, 12, 12, 256, 8, 1024, 8, 224, 14),
    "s3": (1024, 12, 2816, 16, 16, 512, 12, 2048, 8, 336, 14),
    "s4": (1536, 16, 4096, 16, 16, 768, 12, 3072, 12, 336, 14),
    # The bounded-memory test's depth pair (crates/experiments/tests/experiments/scaling.rs): s1's
    # language width at 2 and 8 decoder layers, 64 image tokens.
    "d2": (384, 2, 1024, 8, 8, 128, 2, 512, 4, 64, 8),
    "d8": (384, 8, 1024, 8, 8, 128, 2, 512, 4, 64, 8),
}
SERIES = ["s0", "s1", "s2", "s3", "s4"]


def config_for(shape, tiny):
    (h, layers, inter, heads, kv, vh, vlayers, vinter, vheads, image, patch) = shape
    tc_tiny = tiny["text_config"]
    vc = CLIPVisionConfig(
        hidden_size=vh, intermediate_size=vinter, num_hidden_layers=vlayers,
        num_attention_heads=vheads, image_size=image, patch_size=patch, projection_dim=vh,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    tc = LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=tc_tiny["vocab_size"], rms_norm_eps=1e-6,
        bos_token_id=tc_tiny["bos_token_id"], eos_token_id=tc_tiny["eos_token_id"],
        pad_token_id=tc_tiny["pad_token_id"], max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    tokens = (image // patch) ** 2
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=tiny["image_token_index"],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=tokens, tie_word_embeddings=False,
    ), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SERIES), help="comma-separated, of " + ",".join(SIZES))
    ap.add_argument("--out", default=os.path.join("models", "scaling"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(os.path.join(TINY, "config.json")) as f:
        tiny = json.load(f)
    for name in args.sizes.split(","):
        if name not in SIZES:
            raise SystemExit(f"gen_scaling_series: unknown size {name!r} (known: {', '.join(SIZES)})")
        shape = SIZES[name]
        cfg, tokens = config_for(shape, tiny)
        out = os.path.join(args.out, name)
        meta_path = os.path.join(out, "scaling.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                if json.load(f).get("shape") == list(shape):
                    print(f"{name}: kept {out}")
                    continue
        torch.manual_seed(args.seed)
        model = LlavaForConditionalGeneration(cfg).eval()
        params = {
            "vision": sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n),
            "projector": sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n),
        }
        params["total"] = sum(p.numel() for p in model.parameters())
        params["language"] = params["total"] - params["vision"] - params["projector"]
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")
        for f in ("tokenizer.json",):
            shutil.copy(os.path.join(TINY, f), os.path.join(out, f))
        with open(os.path.join(TINY, "preprocessor_config.json")) as f:
            pre = json.load(f)
        pre["crop_size"] = {"height": cfg.vision_config.image_size, "width": cfg.vision_config.image_size}
        pre["size"] = {"shortest_edge": cfg.vision_config.image_size}
        with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
            json.dump(pre, f, indent=2)
        (h, layers, inter, heads, kv, vh, vlayers, vinter, vheads, image, patch) = shape
        meta = {
            "shape": list(shape),
            "parameters": params,
            "language": {"hidden": h, "layers": layers, "intermediate": inter, "heads": heads, "kv_heads": kv},
            "vision": {"hidden": vh, "layers": vlayers, "intermediate": vinter, "heads": vheads,
                       "image_size": image, "patch_size": patch},
            "image_tokens": tokens,
            "seed": args.seed,
            "transformers": __import__("transformers").__version__,
        }
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
        print(f"{name}: {params['total'] / 1e6:.1f}M parameters, {tokens} image tokens -> {out}")


if __name__ == "__main__":
    main()
