"""transformers' view of the embedded tiny Qwen2-VL: loads models/tiny-qwen2-vl with
Qwen2VLForConditionalGeneration (the reference implementation), asks the first easy-VQA test
questions in the checkpoint's own chat template, and saves what it computed so the Rust tests can
check that both agree.

    .venv/bin/python python/gen_tiny_qwen2vl_reference.py [models/tiny-qwen2-vl]

Writes <model>/transformers_reference.safetensors (`input_ids_<i>`: the prompt with its image
placeholder expanded as Qwen2VLProcessor does, `logits_<i>` = last-position logits of question i)
and <model>/transformers_reference.json (questions, answers transformers generated greedily,
versions). Rerun after retraining the model.
"""

import json
import os
import sys

import easy_vqa
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

N_QUESTIONS = 16


def main(argv):
    model_dir = argv[1] if len(argv) > 1 else os.path.join("models", "tiny-qwen2-vl")
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "chat_template.jinja")) as f:
        tok.chat_template = f.read()
    proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    cfg = model.config
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    merge = proc.merge_size
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    tensors, rows = {}, []
    for i in range(N_QUESTIONS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": texts[i]}]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = proc(images=[Image.open(paths[image_ids[i]]).convert("RGB")], return_tensors="pt")
        grid = image["image_grid_thw"]
        n = int(grid[0].prod()) // merge**2
        # Qwen2VLProcessor.replace_image_token: one <|image_pad|> per merged token.
        expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
        input_ids = torch.tensor([tok(expanded)["input_ids"]])
        types = (input_ids == cfg.image_token_id).to(torch.int32)
        kwargs = dict(pixel_values=image["pixel_values"], image_grid_thw=grid, mm_token_type_ids=types)
        with torch.no_grad():
            logits = model(input_ids=input_ids, **kwargs).logits[0, -1]
            gen = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=4,
                do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id, **kwargs,
            )[0, input_ids.shape[1]:]
        answer = tok.decode(gen, skip_special_tokens=True).strip()
        tensors[f"input_ids_{i}"] = input_ids[0].contiguous()
        tensors[f"logits_{i}"] = logits.contiguous()
        rows.append({"question": texts[i], "answer": answers[i], "image_id": image_ids[i], "transformers_answer": answer})
    save_file(tensors, os.path.join(model_dir, "transformers_reference.safetensors"))
    meta = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0], "questions": rows}
    with open(os.path.join(model_dir, "transformers_reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    correct = sum(r["answer"] == r["transformers_answer"] for r in rows)
    print(f"transformers answered {correct}/{len(rows)} of the first test questions correctly")


if __name__ == "__main__":
    main(sys.argv)
