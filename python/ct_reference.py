"""Reference logits for a compressed-tensors LLaVA checkpoint (the Python side of the Rust
quantized-checkpoint tests): loads MODEL_DIR in float32, runs one forward, writes the logits.

Run from the repository root with the project's environment:
    .venv/bin/python python/ct_reference.py MODEL_DIR INPUTS.safetensors OUT.safetensors [--dequantize | --decompress]
INPUTS: `input_ids` int64 [1, T] (image token already repeated image_seq_length times) and
`pixel_values` float32 [1, 3, H, W]. OUT: `logits` float32 [T, vocab]; metadata `loaded_by`,
`activation_quant` and the library versions. Loading is strict (the checkpoints come from our
exporter): missing/unexpected/mismatched keys, or a quantized tensor of the wrong dtype or shape,
exit non-zero with the message.

`loaded_by`:
  transformers                   from_pretrained(dtype=float32); q*scale computed in float32.
  compressed-tensors-decompress  asymmetric pack-quantized weights (transformers 5.24 + compressed-
                                 tensors 0.20.1 cannot load the packed weight_zero_point), or
                                 --decompress: compressed-tensors' compressor decompresses each module
                                 (scale cast to float32) into a float32 state dict, loaded strictly.
  transformers-dequantize        --dequantize, CompressedTensorsConfig(dequantize=True): q*scale is
                                 computed in the checkpoint's scale dtype (bf16-rounded weights).
Activation quantization (checked on W8A8 int-quantized, dynamic per-token and static per-tensor):
on the default transformers path, compressed-tensors' wrapped Linear.forward fake-quantizes each
targeted linear's input (a hooked linear gives exactly F.linear(fake_quantize(x), W)), so nothing is
added (`compressed-tensors-forward`). With dequantize=True transformers does not (and reports static
input_scale keys as unexpected), and the decompress path is a plain float model: there this script
adds pre-hooks applying compressed-tensors' fake_quantize (`explicit-fake-quantize`).

"""

import argparse
import json
import os
import re
import sys

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from compressed_tensors.utils.match import match_named_modules, match_targets
from safetensors.torch import load_file, save_file
from transformers import CompressedTensorsConfig, LlavaConfig, LlavaForConditionalGeneration

# Checkpoint key -> runtime name, first match wins: the layout transformers 5.x writes
# (`language_model.model.*`, `language_model.lm_head`, `vision_tower.*`, `multi_modal_projector.*`) and
# the 4.x vision layout; the >=4.52 layout (`model.*`, `lm_head`) is already the runtime one.
KEY_RENAMES = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
]
INPUT_QPARAMS = ("input_scale", "input_zero_point")


class LoadError(Exception):
    """A checkpoint that does not load cleanly."""


def read_quant_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        qc = json.load(f).get("quantization_config")
    if qc is None or qc.get("quant_method") != "compressed-tensors":
        raise LoadError(f"{model_dir}/config.json has no compressed-tensors quantization_config")
    qcfg = QuantizationConfig.model_validate(qc)
    if qcfg.kv_cache_scheme is not None:
        raise LoadError("kv_cache_scheme is not supported")
    for name, scheme in qcfg.config_groups.items():
        if scheme.output_activations is not None:
            raise LoadError(f"{name}: output_activations are not supported")
        if scheme.weights is None:
            raise LoadError(f"{name}: a scheme without weight quantization is not supported")
    return qcfg


def enum_str(x):
    return x.value if hasattr(x, "value") else str(x)


def scheme_format(scheme, qcfg):
    return enum_str(scheme.format or qcfg.format)


def needs_ct_decompress(qcfg):
    """The upstream bug: transformers cannot load asymmetric pack-quantized weights."""
    return any(
        scheme_format(s, qcfg) == "pack-quantized" and not s.weights.symmetric for s in qcfg.config_groups.values()
    )


def module_schemes(model, qcfg):
    """Runtime module name -> scheme, matched as compressed-tensors' apply_quantization_config does
    (targets minus `ignore`, the first matching target's scheme wins)."""
    target_to_scheme = {}
    for scheme in qcfg.config_groups.values():
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    out = {}
    for name, module in match_named_modules(model, target_to_scheme, qcfg.ignore):
        if not isinstance(module, torch.nn.Linear):
            raise LoadError(f"{name}: only Linear modules can be quantized here, not {type(module).__name__}")
        out[name] = target_to_scheme[match_targets(name, module, target_to_scheme)[0]]
    if not out:
        raise LoadError("the quantization_config matches no module")
    return out


def checkpoint_tensors(model_dir):
    """Every tensor of the checkpoint (single file or sharded with an index), keyed by runtime name."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        for key, t in load_file(os.path.join(model_dir, fname)).items():
            name = key
            for pat, repl in KEY_RENAMES:
                if re.match(pat, key):
                    name = re.sub(pat, repl, key, count=1)
                    break
            if name in out:
                raise LoadError(f"duplicate tensor {key}")
            out[name] = t
    return out


def expected_layout(fmt, scheme, n, k):
    """name -> (dtypes, shape) of what compressed-tensors stores for one quantized [n, k] linear."""
    w = scheme.weights
    if enum_str(w.type) != "int":
        raise LoadError(f"{w.type} weights are not supported")
    groups = {"channel": 1, "group": -(-k // (w.group_size or k))}.get(enum_str(w.strategy))
    if groups is None:
        raise LoadError(f"weight strategy {enum_str(w.strategy)} is not supported")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    out = {"weight_scale": (floats, (n, groups))}
    if fmt == "pack-quantized":
        out["weight_packed"] = ((torch.int32,), (n, -(-k * w.num_bits // 32)))
        out["weight_shape"] = ((torch.int64, torch.int32), (2,))
        if not w.symmetric:
            out["weight_zero_point"] = ((torch.int32,), (-(-n * w.num_bits // 32), groups))
    elif fmt == "int-quantized":
        out["weight"] = ((torch.int8,), (n, k))
        if not w.symmetric:
            out["weight_zero_point"] = ((torch.int8, torch.int32), (n, groups))
    else:
        raise LoadError(f"format {fmt} is not supported")
    act = scheme.input_activations
    if act is not None:
        if enum_str(act.type) != "int":
            raise LoadError(f"{act.type} input activations are not supported")
        if act.dynamic:
            if enum_str(act.strategy) not in ("token", "tensor"):
                raise LoadError(f"dynamic {enum_str(act.strategy)} input activations are not supported")
        elif enum_str(act.strategy) == "tensor":
            out["input_scale"] = (floats, (1,))
            if not act.symmetric:
                out["input_zero_point"] = ((torch.int8, torch.int32), (1,))
        else:
            raise LoadError(f"static {enum_str(act.strategy)} input activations are not supported")
    return out


def validate_quantized(tensors, schemes, modules, qcfg):
    """Every quantized module stores exactly its format's tensors (plus an optional bias), with the
    dtypes and shapes compressed-tensors writes; transformers alone would cast or broadcast some."""
    for name, scheme in schemes.items():
        m, fmt = modules[name], scheme_format(scheme, qcfg)
        layout = expected_layout(fmt, scheme, m.out_features, m.in_features)
        present = {k[len(name) + 1 :] for k in tensors if k.startswith(name + ".") and "." not in k[len(name) + 1 :]}
        missing, extra = set(layout) - present, present - set(layout) - {"bias"}
        if missing or extra:
            raise LoadError(f"{name} ({fmt}): missing {sorted(missing)}, unexpected {sorted(extra)}")
        for p, (dtypes, shape) in layout.items():
            t = tensors[f"{name}.{p}"]
            if t.dtype not in dtypes or tuple(t.shape) != shape:
                raise LoadError(
                    f"{name}.{p}: {t.dtype} {list(t.shape)}, {fmt} needs {'/'.join(map(str, dtypes))} {list(shape)}"
                )
        if "weight_shape" in layout and tensors[f"{name}.weight_shape"].tolist() != [m.out_features, m.in_features]:
            raise LoadError(f"{name}.weight_shape is {tensors[f'{name}.weight_shape'].tolist()}")


def check_loading_info(info, allowed_unexpected=(), source="transformers load report"):
    problems = []
    for kind, keys in info.items():
        keys = [k for k in keys if not (kind == "unexpected_keys" and k in allowed_unexpected)]
        if keys:
            problems.append(f"{kind}: {sorted(map(str, keys))}")
    if problems:
        raise LoadError(f"{source}: " + "; ".join(problems))


def check_float32(model):
    if model.dtype != torch.float32:
        raise LoadError(f"model loaded as {model.dtype}, expected float32")


def static_input_qparams(tensors, schemes):
    """Module name -> {input_scale[, input_zero_point]} for static activation schemes."""
    out = {}
    for name, scheme in schemes.items():
        act = scheme.input_activations
        if act is None or act.dynamic:
            continue
        qp = {p: tensors[f"{name}.{p}"] for p in INPUT_QPARAMS if f"{name}.{p}" in tensors}
        if "input_scale" not in qp:
            raise LoadError(f"{name}: static input activations but no input_scale in the checkpoint")
        if not act.symmetric and "input_zero_point" not in qp:
            raise LoadError(f"{name}: asymmetric static input activations but no input_zero_point")
        qp["input_scale"] = qp["input_scale"].float()
        out[name] = qp
    return out


def add_activation_fake_quant(model, schemes, static_qparams):
    """Forward pre-hooks applying compressed-tensors' fake_quantize to each targeted linear's input,
    as its own quantized forward (lifecycle/forward.py: forward_quantize) does."""
    modules = dict(model.named_modules())
    count = 0
    for name, scheme in schemes.items():
        act = scheme.input_activations
        if act is None:
            continue
        module = modules[name]

        def hook(mod, args, act=act, qp=static_qparams.get(name)):
            (x,) = args
            if act.dynamic:
                scale, zp = compute_dynamic_scales_and_zp(value=x, args=act, module=mod)
            else:
                scale, zp = qp["input_scale"], qp.get("input_zero_point")
            return (fake_quantize(x=x, scale=scale, zero_point=zp, args=act),)

        module.register_forward_pre_hook(hook)
        count += 1
    return "explicit-fake-quantize" if count else "none"


def load_transformers(model_dir, qcfg, dequantize):
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, output_loading_info=True, **kw
        )
    except RuntimeError as e:  # transformers raises on mismatched shapes
        raise LoadError(f"transformers could not load {model_dir}: {e}") from e
    check_float32(model)
    schemes = module_schemes(model, qcfg)
    tensors = checkpoint_tensors(model_dir)
    validate_quantized(tensors, schemes, dict(model.named_modules()), qcfg)
    if not dequantize:
        check_loading_info(info)
        modules = dict(model.named_modules())
        for name, scheme in schemes.items():
            m = modules[name]
            if getattr(m, "quantization_scheme", None) is None:
                raise LoadError(f"{name}: transformers did not attach a quantization scheme")
            if scheme.input_activations is not None and "forward" not in vars(m):
                raise LoadError(f"{name}: compressed-tensors' quantized forward is not installed")
        uses_act = any(s.input_activations is not None for s in schemes.values())
        return model.eval(), "transformers", "compressed-tensors-forward" if uses_act else "none"
    # dequantize=True: transformers leaves the activation qparams unloaded; take them here.
    qparams = static_input_qparams(tensors, schemes)
    check_loading_info(info, {f"{n}.{p}" for n, qp in qparams.items() for p in qp})
    act = add_activation_fake_quant(model, schemes, qparams)
    return model.eval(), "transformers-dequantize", act


def load_ct_decompress(model_dir, qcfg, weights_only=False):
    config = LlavaConfig.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    schemes = module_schemes(model, qcfg)
    tensors = checkpoint_tensors(model_dir)
    validate_quantized(tensors, schemes, dict(model.named_modules()), qcfg)
    state = {}
    consumed = set()
    for name, scheme in schemes.items():
        fmt = scheme_format(scheme, qcfg)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        names = set(compressor.compression_param_names(scheme))
        sd = {p: tensors[f"{name}.{p}"] for p in names}
        sd["weight_scale"] = sd["weight_scale"].float()  # q*scale in float32, as transformers' float32 load
        state[f"{name}.weight"] = compressor.decompress(sd, scheme)["weight"].float()
        consumed |= {f"{name}.{p}" for p in names} | {f"{name}.{p}" for p in INPUT_QPARAMS}
        if f"{name}.bias" in tensors:
            state[f"{name}.bias"] = tensors[f"{name}.bias"].float()
            consumed.add(f"{name}.bias")
    for key, t in tensors.items():
        if key not in consumed:
            if not t.is_floating_point():
                raise LoadError(f"{key}: unquantized tensor of dtype {t.dtype}")
            state[key] = t.float()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise LoadError(f"loading the decompressed state dict: {e}") from e
    missing = list(result.missing_keys)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False)
    if tied and missing == ["lm_head.weight"]:
        missing = []
        model.lm_head.weight = model.get_input_embeddings().weight
    check_loading_info(
        {"missing_keys": missing, "unexpected_keys": result.unexpected_keys}, source="decompressed state dict"
    )
    if weights_only:
        return model, "compressed-tensors-decompress", "off (--weights-only)"
    qparams = static_input_qparams(tensors, schemes)
    act = add_activation_fake_quant(model, schemes, qparams)
    return model, "compressed-tensors-decompress", act


def read_inputs(path):
    t = load_file(path)
    ids, pix = t.get("input_ids"), t.get("pixel_values")
    if ids is None or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != 1:
        raise LoadError(f"{path}: input_ids must be int64 [1, T]")
    if pix is None or pix.dtype != torch.float32 or pix.dim() != 4 or pix.shape[:2] != (1, 3):
        raise LoadError(f"{path}: pixel_values must be float32 [1, 3, H, W]")
    return ids, pix


def reference_logits(model_dir, ids, pix, dequantize=False, decompress=False, weights_only=False):
    """(logits [T, vocab] float32, metadata dict) for one checkpoint and one prompt."""
    qcfg = read_quant_config(model_dir)
    if weights_only:
        if dequantize:
            raise LoadError("--weights-only takes the decompress path; --dequantize excludes it")
        decompress = True
    if dequantize and decompress:
        raise LoadError("--dequantize and --decompress exclude each other")
    if decompress or (needs_ct_decompress(qcfg) and not dequantize):
        model, loaded_by, act = load_ct_decompress(model_dir, qcfg, weights_only)
    else:
        model, loaded_by, act = load_transformers(model_dir, qcfg, dequantize)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pix).logits
    meta = {
        "loaded_by": loaded_by,
        "activation_quant": act,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__,
    }
    return logits[0].float().contiguous(), meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("inputs")
    ap.add_argument("out")
    ap.add_argument("--dequantize", action="store_true", help="load with CompressedTensorsConfig(dequantize=True)")
    ap.add_argument("--decompress", action="store_true", help="always use compressed-tensors' decompressor")
    ap.add_argument("--weights-only", action="store_true",
                    help="decompress the weights and leave activations in float (checks W8A8 weights exactly)")
    a = ap.parse_args()
    torch.manual_seed(0)
    try:
        ids, pix = read_inputs(a.inputs)
        logits, meta = reference_logits(a.model_dir, ids, pix, a.dequantize, a.decompress, a.weights_only)
    except LoadError as e:
        sys.exit(f"ct_reference: {e}")
    save_file({"logits": logits}, a.out, metadata=meta)
    print(f"{a.out}: logits {list(logits.shape)}, {meta['loaded_by']}, activations {meta['activation_quant']}")


if __name__ == "__main__":
    main()
