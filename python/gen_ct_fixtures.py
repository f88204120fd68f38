"""Import fixtures for compressed-tensors checkpoints: tiny random LLaVA models quantized and written
by the compressed-tensors library itself (as llm-compressor does), with the reference logits
python/ct_reference.py computes for them. A checkpoint another tool wrote must load in our Rust
code and reproduce these logits.

Run from the repository root with the project's environment:
    .venv/bin/python python/gen_ct_fixtures.py
Writes crates/core/tests/fixtures/compressed/. The fixtures are committed; `VERSION` records the
generator version and the transformers/compressed-tensors/torch versions that produced them.

Cases (each a folder with config.json, model.safetensors, expected.safetensors holding input_ids,
pixel_values and logits, and expected.json with the prompt ids and the path that loaded it):
  w4a16_g32_sym   bf16; language-model linears int4 symmetric, group 32 (pack-quantized);
                  vision tower, projector and lm_head left dense
  w4a16_g32_asym  as above, asymmetric (packed weight_zero_point); the reference goes through
                  compressed-tensors' decompressor (transformers 5.24 cannot load it)
  w8a16_channel   bf16; int8 symmetric per-channel weights only (pack-quantized, 4 values per
                  int32) on the language-model linears, lm_head and the projector; vision dense
  w8a8_dynamic    float32; int-quantized: int8 symmetric per-channel weights, int8 symmetric
                  per-token dynamic input activations; language-model linears only
  w8a8_static     float32; int-quantized: int8 symmetric per-channel weights, int8 symmetric
                  static per-tensor input activations (`input_scale`, calibrated as min-max over a
                  calibration prompt and image that are not the test's, so some test activations
                  clip); language-model linears only
Model: LLaMA hidden 64 / intermediate 128 / 2 layers / 4 heads / 2 kv heads / vocab 320, CLIP
hidden 32 / 2 layers / image 28 / patch 14, vision_feature_layer -2 (the llava-1.5 default; with
2 CLIP layers the last one is unused), `default` select, image_token_index 300, 4 image tokens.
Weights are seeded random with more spread than the default init (as gen_llava_fixtures.py), the
qparams min-max (compressed-tensors' calculate_qparams), what an observer-only calibration gives.
expected.json also records how far the logits move against the unquantized model, and for W8A8
against the same weights without activation quantization, so a test tolerance can be checked to be
well below the effect it is meant to see.
"""

import json
import os
import shutil
import sys

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ct_reference  # noqa: E402

GENERATOR_VERSION = 2
OUT = os.path.join("crates", "core", "tests", "fixtures", "compressed")
IMAGE_TOKEN = 300
IMAGE_SEQ = 4  # (28 / 14)^2 patches, CLS dropped by the `default` select
PROMPT_IDS = [1, 17, 42, 99, IMAGE_TOKEN, 7, 123, 250, 5]

VISION = "re:.*vision_tower.*"
PROJECTOR = "re:.*multi_modal_projector.*"
LM_HEAD = "lm_head"


def int_args(bits, symmetric, strategy, group_size=None, dynamic=False):
    return QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size, dynamic=dynamic
    )


CASES = [
    # name, model dtype, scheme, ignore, description
    (
        "w4a16_g32_sym", torch.bfloat16,
        QuantizationScheme(targets=["Linear"], weights=int_args(4, True, "group", 32)),
        [LM_HEAD, VISION, PROJECTOR], "int4 symmetric group 32, weights only",
    ),
    (
        "w4a16_g32_asym", torch.bfloat16,
        QuantizationScheme(targets=["Linear"], weights=int_args(4, False, "group", 32)),
        [LM_HEAD, VISION, PROJECTOR], "int4 asymmetric group 32, weights only",
    ),
    (
        "w8a16_channel", torch.bfloat16,
        QuantizationScheme(targets=["Linear"], weights=int_args(8, True, "channel")),
        [VISION], "int8 symmetric per channel, weights only",
    ),
    (
        "w8a8_dynamic", torch.float32,
        QuantizationScheme(
            targets=["Linear"], weights=int_args(8, True, "channel"),
            input_activations=int_args(8, True, "token", dynamic=True),
        ),
        [LM_HEAD, VISION, PROJECTOR],
        "int8 symmetric per channel weights, int8 symmetric per-token dynamic activations",
    ),
    (
        "w8a8_static", torch.float32,
        QuantizationScheme(
            targets=["Linear"], weights=int_args(8, True, "channel"),
            input_activations=int_args(8, True, "tensor"),
        ),
        [LM_HEAD, VISION, PROJECTOR],
        "int8 symmetric per channel weights, int8 symmetric static per-tensor activations",
    ),
]
FORMATS = {"w4a16_g32_sym": "pack-quantized", "w4a16_g32_asym": "pack-quantized",
           "w8a16_channel": "pack-quantized", "w8a8_dynamic": "int-quantized",
           "w8a8_static": "int-quantized"}


def tiny_config():
    vc = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=32,
    )
    tc = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=IMAGE_SEQ, tie_word_embeddings=False,
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


def calibrate(model):
    """Min-max weight qparams, as an observer-only calibration (make.py style) would set them."""
    for _, m in model.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is None:
            continue
        w, a = m.weight.data.float(), s.weights
        if a.strategy == "group":
            wg = w.unflatten(-1, (w.shape[-1] // a.group_size, a.group_size))
            mn, mx = wg.amin(-1), wg.amax(-1)
        elif a.strategy == "channel":
            mn, mx = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            raise ValueError(a.strategy)
        scale, zp = calculate_qparams(mn, mx, a)
        m.weight_scale.data.copy_(scale.to(m.weight_scale.dtype))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zp.to(m.weight_zero_point.dtype))
        m.quantization_status = QuantizationStatus.FROZEN


def calibrate_static_inputs(model, ids, pix):
    """Min-max static input scales (`input_scale`, per tensor) over one calibration forward with
    quantization off, as a MinMax observer over the same batch would set them."""
    quantized = {n: m for n, m in model.named_modules()
                 if getattr(m, "quantization_scheme", None) is not None
                 and m.quantization_scheme.input_activations is not None
                 and not m.quantization_scheme.input_activations.dynamic}
    if not quantized:
        return
    seen, hooks = {}, []
    for n, m in quantized.items():
        def hook(mod, args, n=n):
            x = args[0].detach().float()
            lo, hi = x.amin(), x.amax()
            if n in seen:
                lo, hi = torch.minimum(lo, seen[n][0]), torch.maximum(hi, seen[n][1])
            seen[n] = (lo, hi)
        hooks.append(m.register_forward_pre_hook(hook))
        m.quantization_enabled = False
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pix)
    for h in hooks:
        h.remove()
    for n, m in quantized.items():
        args = m.quantization_scheme.input_activations
        lo, hi = seen[n]
        scale, zp = calculate_qparams(lo.reshape(1), hi.reshape(1), args)
        m.input_scale.data.copy_(scale.reshape(m.input_scale.shape).to(m.input_scale.dtype))
        if hasattr(m, "input_zero_point"):
            m.input_zero_point.data.copy_(zp.reshape(m.input_zero_point.shape).to(m.input_zero_point.dtype))
        m.quantization_enabled = True


def calibration_inputs():
    """A prompt and an image that are not the test's (seeded)."""
    g = torch.Generator().manual_seed(4321)
    prompt = [1, 60, 11, IMAGE_TOKEN, 200, 3, 77]
    ids = torch.tensor([[t for p in prompt for t in ([p] * IMAGE_SEQ if p == IMAGE_TOKEN else [p])]])
    return ids, torch.randn((1, 3, 28, 28), generator=g)


def write_case(d, name, dtype, scheme, ignore, seed):
    """Quantize a fresh random model with compressed-tensors and save it the way llm-compressor does.
    Returns the unquantized float32 model for comparison."""
    cfg = tiny_config()
    model = LlavaForConditionalGeneration(cfg)
    randomize(model, seed)
    model = model.to(dtype).eval()
    dense = LlavaForConditionalGeneration(cfg).eval()
    dense.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    calibrate(model)
    calibrate_static_inputs(model, *calibration_inputs())
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(d)
    comp.update_config(d)
    gen = os.path.join(d, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    written = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    if written["format"] != FORMATS[name]:
        raise SystemExit(f"{name}: compressed-tensors wrote format {written['format']}, expected {FORMATS[name]}")
    return dense


def logits_without_act_quant(d, ids, pix):
    model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pix).logits[0]


def main():
    torch.manual_seed(0)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    prompt = torch.tensor([PROMPT_IDS])
    ids = torch.tensor([[t for p in PROMPT_IDS for t in ([p] * IMAGE_SEQ if p == IMAGE_TOKEN else [p])]])
    pix = torch.randn((1, 3, 28, 28), generator=torch.Generator().manual_seed(1234))
    for seed, (name, dtype, scheme, ignore, desc) in enumerate(CASES, start=1):
        d = os.path.join(OUT, name)
        dense = write_case(d, name, dtype, scheme, ignore, seed)
        logits, meta = ct_reference.reference_logits(d, ids, pix)
        # The other loading path must agree (transformers vs compressed-tensors' decompressor).
        if meta["loaded_by"] == "transformers":
            other, _ = ct_reference.reference_logits(d, ids, pix, decompress=True)
            if not torch.allclose(logits, other, rtol=0, atol=1e-5):
                raise SystemExit(f"{name}: transformers and decompress paths disagree: {(logits - other).abs().max()}")
        with torch.no_grad():
            ref_dense = dense(input_ids=ids, pixel_values=pix).logits[0]
        save_file(
            {"input_ids": ids.contiguous(), "pixel_values": pix.contiguous(), "logits": logits.contiguous()},
            os.path.join(d, "expected.safetensors"),
        )
        info = {
            "description": desc,
            "model_dtype": str(dtype).removeprefix("torch."),
            "prompt_ids": prompt[0].tolist(),
            "input_ids": ids[0].tolist(),
            "image_token_index": IMAGE_TOKEN,
            "image_seq_length": IMAGE_SEQ,
            "loaded_by": meta["loaded_by"],
            "activation_quant": meta["activation_quant"],
            "max_abs_logit": round(logits.abs().max().item(), 6),
            "max_abs_diff_vs_unquantized": round((logits - ref_dense).abs().max().item(), 6),
        }
        if scheme.input_activations is not None:
            info["max_abs_diff_vs_no_activation_quant"] = round(
                (logits - logits_without_act_quant(d, ids, pix)).abs().max().item(), 6
            )
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(f"{name}: {meta['loaded_by']}, {json.dumps({k: v for k, v in info.items() if k.startswith('max')})}")

    with open(os.path.join(OUT, "VERSION"), "w") as f:
        f.write(
            f"generator {GENERATOR_VERSION}\ntransformers {transformers.__version__}\n"
            f"compressed-tensors {compressed_tensors.__version__}\ntorch {torch.__version__.split('+')[0]}\n"
        )
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
