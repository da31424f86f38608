"""Collation on the real tiny processors and models: exact token layout, labels and image tensors."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from schema_files import digit_image

from ivtlr.data import (IGNORE_INDEX, Example, IVTLRCollator, TrainingItem, build_generation_batch, chat_prompt,
                        format_prompt_text, resize_image)
from ivtlr.data.prompt_cache import PromptCache
from ivtlr.testing import FAMILIES, TinyBundle, build_tiny



@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request) -> TinyBundle:
    return build_tiny(request.param)


def items() -> list[TrainingItem]:
    prompt = format_prompt_text("Which digit is written in the image?", ["zero", "one", "two"])
    return [
        TrainingItem("a", digit_image(0), prompt, 0, "It is round.\nTherefore, the answer is A"),
        TrainingItem("b", digit_image(1), prompt, 3, "Therefore, the answer is B"),
        TrainingItem("c", digit_image(2), prompt, 1, "It bends once. So it is two.\nTherefore, the answer is C"),
    ]


def prompt_encoding(tiny: TinyBundle, item: TrainingItem, image: Image.Image | None = None):
    """What the processor alone makes of the templated prompt: the reference the batch must contain."""
    has_image = item.image is not None
    text = chat_prompt(tiny.processor, item.prompt, has_image)
    return tiny.processor(text=[text], images=[image or item.image] if has_image else None, return_tensors="pt")


def test_chat_prompt_places_the_image_before_the_question(tiny):
    text = chat_prompt(tiny.processor, "[Question]:Q\n", has_image=True)
    image_marker = tiny.processor.image_token  # the placeholder the processor expands into image tokens
    assert text.index(image_marker) < text.index("[Question]:Q\n")
    assert image_marker not in chat_prompt(tiny.processor, "[Question]:Q\n", has_image=False)


def test_training_batch_is_prompt_then_latents_then_target_and_eos(tiny):
    batch = IVTLRCollator(tiny.processor, tiny.latent_token_id)(items())
    tokenizer = tiny.tokenizer
    width = batch["input_ids"].shape[1]
    for row, item in enumerate(items()):
        prompt_ids = prompt_encoding(tiny, item)["input_ids"][0].tolist()
        target_ids = tokenizer(item.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = len(prompt_ids) + item.n_latent + len(target_ids)
        padding = width - length
        assert batch["input_ids"][row].tolist() == (
            prompt_ids + [tiny.latent_token_id] * item.n_latent + target_ids + [tokenizer.pad_token_id] * padding
        )
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * padding
        labels = batch["labels"][row]
        assert labels.tolist() == [IGNORE_INDEX] * (len(prompt_ids) + item.n_latent) + target_ids + [
            IGNORE_INDEX
        ] * padding
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == item.target + tokenizer.eos_token
    assert min(batch["attention_mask"].sum(dim=1).tolist()) < width  # the batch really is padded


def test_image_tensors_are_the_processor_outputs_in_sample_order(tiny):
    batch = IVTLRCollator(tiny.processor, tiny.latent_token_id)(items())
    references = [prompt_encoding(tiny, item) for item in items()]
    torch.testing.assert_close(batch["pixel_values"], torch.cat([ref["pixel_values"] for ref in references]))
    if tiny.family.startswith("qwen"):
        assert batch["image_grid_thw"].tolist() == [ref["image_grid_thw"][0].tolist() for ref in references]
        for row, reference in enumerate(references):
            types = reference["mm_token_type_ids"][0].tolist()
            assert batch["mm_token_type_ids"][row].tolist() == types + [0] * (batch["input_ids"].shape[1] - len(types))
        image_tokens = (batch["input_ids"] == tiny.image_token_id).sum().item()
        assert batch["mm_token_type_ids"].sum().item() == image_tokens > 0


def test_images_are_resized_before_the_processor(tiny):
    item = items()[0]
    batch = IVTLRCollator(tiny.processor, tiny.latent_token_id, image_size=(40, 24))([item])
    resized = item.image.resize((40, 24), Image.Resampling.BICUBIC)
    torch.testing.assert_close(batch["pixel_values"], prompt_encoding(tiny, item, resized)["pixel_values"])
    assert not torch.equal(batch["pixel_values"], prompt_encoding(tiny, item)["pixel_values"])


def test_resize_image_sizes():
    image = digit_image(0, size=56)
    assert resize_image(image, 280).size == (280, 280)
    assert resize_image(image, (30, 20)).size == (30, 20)
    assert resize_image(image, None) is image


def test_too_long_sample_raises_naming_it(tiny):
    batch = IVTLRCollator(tiny.processor, tiny.latent_token_id)(items())
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    prompt_length = len(prompt_encoding(tiny, items()[1])["input_ids"][0])
    collator = IVTLRCollator(tiny.processor, tiny.latent_token_id, max_length=lengths[1] - 1)
    target_length = lengths[1] - prompt_length - 3
    message = rf"example 'b' is {lengths[1]} tokens long \(prompt {prompt_length}, latents 3, target {target_length}\)"
    with pytest.raises(ValueError, match=message):
        collator([items()[1]])


def test_too_long_samples_can_be_skipped_and_counted(tiny, caplog):
    lengths = IVTLRCollator(tiny.processor, tiny.latent_token_id)(items())["attention_mask"].sum(dim=1).tolist()
    collator = IVTLRCollator(tiny.processor, tiny.latent_token_id, max_length=lengths[1], skip_too_long=True)
    caplog.set_level(logging.WARNING, logger="ivtlr.data.collate")
    batch = collator(items())
    kept = [length for length in lengths if length <= lengths[1]]
    assert batch["attention_mask"].sum(dim=1).tolist() == kept
    assert collator.skipped_too_long == len(lengths) - len(kept) > 0
    assert "example 'a'" in caplog.text or "example 'c'" in caplog.text
    with pytest.raises(ValueError, match="every sample of the batch is longer than max_length=1"):
        IVTLRCollator(tiny.processor, tiny.latent_token_id, max_length=1, skip_too_long=True)(items())


def test_training_batch_runs_through_the_real_model(tiny):
    text_only = TrainingItem("t", None, format_prompt_text("Which is one?", ["one", "two"]), 1,
                             "Therefore, the answer is A")
    batch = IVTLRCollator(tiny.processor, tiny.latent_token_id)([*items(), text_only])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        logits = tiny.model(**inputs).logits
        loss = tiny.model(**batch).loss
    assert logits.shape == (*batch["input_ids"].shape, tiny.model.config.get_text_config().vocab_size)
    assert torch.isfinite(loss)


EXAMPLES = [
    Example("x", digit_image(3), "Which digit is written in the image?", ["three", "four"], "A", "", {}),
    Example("y", digit_image(4), "Which digit is shown?", ["one", "four", "nine"], "B", "", {}),
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_generation_batch_is_prompt_and_latents(tiny, padding_side):
    batch = build_generation_batch(tiny.processor, EXAMPLES, 2, tiny.latent_token_id, padding_side=padding_side)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(EXAMPLES):
        item = TrainingItem(example.id, example.image, format_prompt_text(example.question, example.choices), 0, "")
        sequence = prompt_encoding(tiny, item)["input_ids"][0].tolist() + [tiny.latent_token_id] * 2
        padding = [tiny.tokenizer.pad_token_id] * (width - len(sequence))
        mask = [1] * len(sequence)
        pad_mask = [0] * len(padding)
        if padding_side == "left":
            assert batch["input_ids"][row].tolist() == padding + sequence
            assert batch["attention_mask"][row].tolist() == pad_mask + mask
        else:
            assert batch["input_ids"][row].tolist() == sequence + padding
            assert batch["attention_mask"][row].tolist() == mask + pad_mask
    assert "labels" not in batch
    with torch.no_grad():
        logits = tiny.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_prompts_kept_between_epochs_give_the_batches_encoding_again_gives(tiny):
    cached = IVTLRCollator(tiny.processor, tiny.latent_token_id, image_size=56)
    fresh = IVTLRCollator(tiny.processor, tiny.latent_token_id, image_size=56, prompt_cache_bytes=0)
    first = cached(items())
    for value in first.values():  # what the engine may do to a batch must not reach the kept prompts
        value.zero_()
    later = [TrainingItem(i.id, i.image, i.prompt, i.n_latent + 1, "other target") for i in items()]
    again, expected = cached(later), fresh(later)
    assert again.keys() == expected.keys()
    assert all(torch.equal(again[key], expected[key]) for key in expected)
    assert cached.prompts.hits == len(items()) and len(fresh.prompts) == 0


def test_the_prompt_cache_keeps_the_newest_entries_within_its_budget():
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 1000}
    cache = PromptCache(100, lambda key: sizes[key])
    for key in ("a", "b", "a", "c", "huge"):
        assert cache.get(key, lambda key=key: key) == key
    assert cache.bytes == 80 and len(cache) == 2  # "b" evicted (least recently used), "huge" never kept
    made = []
    cache.get("a", lambda: made.append("a"))
    cache.get("b", lambda: made.append("b") or "b")
    assert made == ["b"]
