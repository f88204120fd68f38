"""transformers' view of the embedded tiny LLaVA: loads models/tiny-llava with
LlavaForConditionalGeneration (the reference implementation), answers the first easy-VQA test
questions, and saves what it computed so the Rust tests can check that both agree.

    .venv/bin/python python/gen_tiny_reference.py [models/tiny-llava]

Writes <model>/transformers_reference.safetensors (`input_ids_<i>`, `logits_<i>` = last-position
logits of question i) and <model>/transformers_reference.json (questions, answers transformers
generated greedily, versions). Rerun after retraining the model.
"""

import json
import os
import sys

import easy_vqa
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

N_QUESTIONS = 16
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


def main(argv):
    model_dir = argv[1] if len(argv) > 1 else os.path.join("models", "tiny-llava")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    proc = CLIPImageProcessorPil.from_pretrained(model_dir)
    cfg = model.config
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    tensors, rows = {}, []
    for i in range(N_QUESTIONS):
        prompt = f"{SYSTEM} USER: <image>\n{texts[i]} ASSISTANT:"
        ids = tok(prompt)["input_ids"]
        expanded = []
        for t in ids:
            expanded.extend([cfg.image_token_index] * cfg.image_seq_length if t == cfg.image_token_index else [t])
        input_ids = torch.tensor([expanded])
        pixel_values = proc(images=Image.open(paths[image_ids[i]]).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0, -1]
            gen = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False,
                eos_token_id=cfg.text_config.eos_token_id, pad_token_id=cfg.text_config.pad_token_id,
            )[0, input_ids.shape[1]:]
        text = tok.decode(gen, skip_special_tokens=True).strip()
        tensors[f"input_ids_{i}"] = torch.tensor(ids)
        tensors[f"logits_{i}"] = logits.contiguous()
        rows.append({"question": texts[i], "answer": answers[i], "image_id": image_ids[i], "transformers_answer": text})
    save_file(tensors, os.path.join(model_dir, "transformers_reference.safetensors"))
    meta = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0], "questions": rows}
    with open(os.path.join(model_dir, "transformers_reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    correct = sum(r["answer"] == r["transformers_answer"] for r in rows)
    print(f"transformers answered {correct}/{len(rows)} of the first test questions correctly")


if __name__ == "__main__":
    main(sys.argv)
