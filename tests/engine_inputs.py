"""Hand-built IVT-LR inputs for engine tests: prompt with an image, n latent slots, an answer, any padding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ivtlr.data.collate import TOKEN_TYPE_KEYS
from ivtlr.testing import TinyBundle, make_test_image


@dataclass
class SampleSpec:
    question: str
    n_latent: int
    answer: str = "The digit is seven. Therefore, the answer is B"
    image_size: tuple[int, int] = (112, 112)
    seed: int = 0


def encode_sample(bundle: TinyBundle, spec: SampleSpec) -> dict:
    """One sample: processor output for the prompt, then latents, answer and EOS, with labels on the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec.question}]}]
    text = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = make_test_image(spec.image_size, seed=spec.seed)
    if bundle.family == "chameleon":
        image = image.resize((bundle.processor.image_processor.crop_size["width"],) * 2)
    enc = bundle.processor(text=[text], images=[image], return_tensors="pt")
    prompt = enc["input_ids"][0]
    answer = torch.tensor(bundle.tokenizer(spec.answer, add_special_tokens=False)["input_ids"] +
                          [bundle.eos_token_id])
    latents = torch.full((spec.n_latent,), bundle.latent_token_id)
    ids = torch.cat([prompt, latents, answer])
    labels = torch.cat([torch.full((len(prompt) + spec.n_latent,), -100), answer])
    # Every other processor output (pixel_values and the family's own keys) travels as the data collator sends it.
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", *TOKEN_TYPE_KEYS)}
    return {"input_ids": ids, "labels": labels, **vision}


def collate(bundle: TinyBundle, samples: list[dict], padding_side: str = "right") -> dict:
    """Pad a list of encoded samples into a batch (either side)."""
    width = max(len(s["input_ids"]) for s in samples)
    batch = {"input_ids": torch.full((len(samples), width), bundle.pad_token_id),
             "labels": torch.full((len(samples), width), -100),
             "attention_mask": torch.zeros(len(samples), width, dtype=torch.long)}
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        batch["input_ids"][b, cols], batch["labels"][b, cols], batch["attention_mask"][b, cols] = \
            s["input_ids"], s["labels"], 1
    for key in sorted(samples[0].keys() - {"input_ids", "labels"}):
        batch[key] = torch.cat([s[key] for s in samples])
    return batch


def make_batch(bundle: TinyBundle, specs: list[SampleSpec], padding_side: str = "right") -> dict:
    return collate(bundle, [encode_sample(bundle, s) for s in specs], padding_side)
