"""Convert a PyTorch `.bin` checkpoint directory (original LLaVA / Q-VLM checkpoints, CLIP
directories) to safetensors, which the Rust loader reads. The directory is converted in place
(new files beside the old ones); config and tokenizer files are left as they are.

    .venv/bin/python python/convert_bin_to_safetensors.py /path/to/llava-v1.3-7b-scienceqa
    .venv/bin/python python/convert_bin_to_safetensors.py /path/to/clip-vit-large-patch14

Single file  pytorch_model.bin                       -> model.safetensors
Sharded      pytorch_model.bin.index.json + shards   -> model-XXXXX-of-YYYYY.safetensors
                                                        + model.safetensors.index.json
Tensors are written with their stored dtype; shared storage (tied weights) is cloned.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file


def load_bin(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: not a state dict")
    return {k: v.contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def main(argv):
    if len(argv) != 2 or not os.path.isdir(argv[1]):
        raise SystemExit(__doc__)
    d = argv[1]
    index = os.path.join(d, "pytorch_model.bin.index.json")
    single = os.path.join(d, "pytorch_model.bin")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
        new_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            state = load_bin(os.path.join(d, shard))
            save_file(state, os.path.join(d, name), metadata={"format": "pt"})
            new_map.update({k: name for k in state})
            print(f"{shard} -> {name} ({len(state)} tensors)")
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": new_map}, f, indent=2)
    elif os.path.isfile(single):
        state = load_bin(single)
        save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        print(f"pytorch_model.bin -> model.safetensors ({len(state)} tensors)")
    else:
        raise SystemExit(f"{d}: no pytorch_model.bin or pytorch_model.bin.index.json")


if __name__ == "__main__":
    main(sys.argv)
