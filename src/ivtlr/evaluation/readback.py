"""What each latent step says: the state it fed back, decoded to text by the language model on its own, the way step
supervision (:mod:`ivtlr.method.supervision`) trains it to be read; and, where the data has written steps, how often
that text is the step the latent replaced."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ivtlr.data import Example
from ivtlr.data.curriculum import split_rationale
from ivtlr.method.supervision import decode_latent_states
from ivtlr.loading import LoadedModel

#: Tokens decoded per latent step: a written step of the demo is 5-8 tokens; longer text is cut.
READBACK_TOKENS = 16


def read_latents(model: LoadedModel, latents: torch.Tensor, max_new_tokens: int = READBACK_TOKENS) -> list[str]:
    """The text each fed-back state (n, D) decodes to (greedy), up to its first newline or EOS."""
    if latents.shape[0] == 0:
        return []
    engine = model.engine
    ids = decode_latent_states(engine.backbone, latents.to(model.device, model.dtype), max_new_tokens)
    texts = []
    for row in ids.tolist():
        stop = next((i for i, token in enumerate(row) if token in engine.eos_token_ids), len(row))
        text = model.tokenizer.decode(row[:stop], skip_special_tokens=True)
        texts.append(text.split("\n", 1)[0].strip())
    return texts


def readback_agreement(model: LoadedModel, examples: Sequence[Example], latents: Mapping[str, torch.Tensor],
                       max_new_tokens: int = READBACK_TOKENS, n_shown: int = 5) -> dict:
    """Per latent step: of the questions whose rationale has that written step, how many latents decode to it
    exactly (both stripped), and a few (written, decoded) pairs to read."""
    steps: list[dict] = []
    for example in examples:
        if example.id not in latents:
            continue
        written = split_rationale(example.rationale) if example.rationale else []
        decoded = read_latents(model, latents[example.id], max_new_tokens)
        for t, text in enumerate(decoded):
            if t >= len(written):
                break
            while len(steps) <= t:
                steps.append({"step": len(steps) + 1, "questions": 0, "matched": 0, "examples": []})
            entry = steps[t]
            entry["questions"] += 1
            entry["matched"] += text == written[t].strip()
            if len(entry["examples"]) < n_shown:
                entry["examples"].append({"id": example.id, "written": written[t].strip(), "decoded": text})
    for entry in steps:
        entry["match_rate"] = entry["matched"] / entry["questions"] if entry["questions"] else 0.0
    return {"max_new_tokens": max_new_tokens, "steps": steps}
