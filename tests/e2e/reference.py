"""transformers' greedy reference texts for the prompts the end-to-end tests send."""

from __future__ import annotations

import torch

from lepton.model_folder import ModelFolder
from lepton.tokenizer import Tokenizer

PROMPTS = ["The quick brown fox", "Return a new list containing the items", "def parse(text):", "Hello"]
MAX_TOKENS = 24
# NOTE: greedy decoding compares argmaxes; a top-2 logit gap below this could flip between two
# correct float implementations. The test asserts every step of the reference is above it, so a
# model change that introduces a near tie fails loudly here instead of flaking.
MIN_MARGIN = 1e-4


def greedy_reference(demo_model_dir) -> dict[str, str]:
    """transformers greedy continuations (text) of PROMPTS, with their logit margins checked."""
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.from_folder(ModelFolder.open(demo_model_dir))
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    texts = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )
        for step, scores in enumerate(out.scores):
            top2 = torch.topk(scores[0], 2).values
            assert float(top2[0] - top2[1]) > MIN_MARGIN, f"near tie at step {step} for {prompt!r}"
        new_ids = out.sequences[0, ids.shape[1]:].tolist()
        texts[prompt] = tokenizer.decode(new_ids)
    return texts


