"""InternVL (model type ``internvl``): the tiny model agrees with the real classes, the backbone computes what the
transformers model computes, the selectable grid lies on the picture row-major, tiles, and the InternVL3 decoder.
The checks every family passes (the CLI end to end, the released processor without torchvision, stage zero) are in
``tests/test_families.py``."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from engine_inputs import SampleSpec, make_batch
from test_engine import _assert_grads_close, _step
from test_infer import unnormalise
from PIL import Image
from transformers import InternVLForConditionalGeneration
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from ivtlr import IVTLR
from ivtlr.backbones import get_backbone, tiny_spec
from ivtlr.backbones.tiny_specs import TinySizes
from ivtlr.evaluation.explain import patch_grid_boxes
from ivtlr.testing import TinyBundle, build_tiny, make_test_image

FAMILY = "internvl"
QUESTION = "Which digit is written in the top left corner of this image?"
TOKENS_PER_TILE = 16  # the default 112-px tile: 8x8 patches of 14, pixel-shuffled 2x2 -> 4x4


@pytest.fixture(scope="module")
def bundle() -> TinyBundle:
    return build_tiny(FAMILY)


def conversation(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def encode(bundle: TinyBundle, images, texts=(QUESTION,), **kwargs):
    prompts = [bundle.processor.apply_chat_template(conversation(t), add_generation_prompt=True, tokenize=False)
               for t in texts]
    return bundle.processor(text=prompts, images=images, return_tensors="pt", padding=True, **kwargs)


def variant(bundle: TinyBundle, *, text_model_type: str = "qwen3", vision_layers: int | None = None,
            attn_implementation: str = "sdpa") -> TinyBundle:
    """The tiny bundle with another decoder (qwen2: InternVL3) or vision depth, same tokenizer and processor."""
    config = tiny_spec(FAMILY).build_config(bundle.tokenizer, TinySizes(64, 2, 4, 2, 128), 112,
                                            text_model_type=text_model_type)
    if vision_layers is not None:
        config.vision_config.num_hidden_layers = vision_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return dataclasses.replace(bundle, model=model.eval())


# ---- the tiny model is a faithful InternVL -------------------------------------------------------------------------
def test_token_ids_template_and_placeholder_expansion(bundle):
    tokenizer, config, processor = bundle.tokenizer, bundle.model.config, bundle.processor
    ids = tokenizer.convert_tokens_to_ids(["<IMG_CONTEXT>", "<img>", "</img>", "<|im_end|>", "<|endoftext|>"])
    assert [config.image_token_id, tokenizer.start_image_token_id, tokenizer.end_image_token_id,
            config.text_config.eos_token_id, config.text_config.pad_token_id] == ids
    assert (processor.image_token_id, tokenizer.context_image_token_id) == (ids[0], ids[0])
    assert config.text_config.model_type == "qwen3"  # as InternVL3.5
    text = processor.apply_chat_template(conversation("Hi?"), add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(conversation("Hi?"), add_generation_prompt=True, tokenize=False) == text
    encoded = processor(text=[text], images=[make_test_image()], return_tensors="pt")
    expanded = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * TOKENS_PER_TILE + "</img>")
    assert encoded["input_ids"][0].tolist() == tokenizer(expanded)["input_ids"]
    # The count the processor expands to is what the vision tower and projector produce for one tile.
    with torch.no_grad():
        features = bundle.model.model.get_image_features(pixel_values=encoded["pixel_values"]).pooler_output
    assert processor.image_seq_length == config.image_seq_length == features.shape[1] == TOKENS_PER_TILE


@pytest.mark.parametrize("size", [(200, 60), (60, 200), (112, 112), (40, 30)])
def test_one_tile_per_image_whatever_its_shape(bundle, size):
    """Tiling is off by default (one 4x4 grid per image); asking for it gives the stock tiles plus a thumbnail."""
    image = make_test_image(size, seed=1)
    single = encode(bundle, [image])
    assert single["pixel_values"].shape == (1, 3, 112, 112)
    assert int((single["input_ids"] == bundle.image_token_id).sum()) == TOKENS_PER_TILE
    tiled = encode(bundle, [image], crop_to_patches=True)
    expected = bundle.processor.image_processor.get_number_of_image_patches(size[1], size[0],
                                                                           {"crop_to_patches": True})
    assert tiled["pixel_values"].shape[0] == expected
    assert int((tiled["input_ids"] == bundle.image_token_id).sum()) == TOKENS_PER_TILE * expected
    if size[0] != size[1]:
        assert expected > 1


# ---- the backbone computes what the transformers model computes ----------------------------------------------------
def test_backbone_forward_equals_the_transformers_model(bundle):
    """embed -> decoder() -> lm_head() with 1-D positions gives InternVLForConditionalGeneration's own logits."""
    inputs = encode(bundle, [make_test_image((112, 112), seed=1), make_test_image((84, 140), seed=2)],
                    texts=(QUESTION, "Count?"), padding_side="right")
    mask = inputs["attention_mask"]
    assert not mask.all()  # the shorter prompt is padded
    backbone = get_backbone(bundle.model)
    vision = {"pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        embedded = backbone.embed(inputs["input_ids"], vision)
        positions, next_start = backbone.prompt_positions(inputs["input_ids"], mask, vision, "original")
        hidden = backbone.run_decoder(embedded.embeds, mask, positions, cache=None).last_hidden_state
        ours = backbone.logits(hidden)
        reference = bundle.model(**inputs).logits
    assert torch.equal(embedded.image_mask, inputs["input_ids"] == bundle.image_token_id)
    assert next_start.tolist() == mask.sum(-1).tolist()
    valid = mask.bool()
    assert (ours[valid] - reference[valid]).abs().max() < 1e-5


def test_decoder_is_the_text_model_and_attention_is_its_self_attention(bundle):
    backbone = get_backbone(bundle.model)
    decoder = backbone.decoder()
    assert decoder is bundle.model.model.language_model and backbone.lm_head() is bundle.model.lm_head
    attention = backbone.attention_modules()
    assert len(attention) == bundle.model.config.text_config.num_hidden_layers
    assert all(isinstance(module, Qwen3Attention) for module in attention)
    vision_modules = set(map(id, bundle.model.model.vision_tower.modules()))
    assert not any(id(module) in vision_modules for module in attention)
    # That it maps embeddings to final-norm hidden states is what the forward test above checks (its logits).


# ---- the selectable grid lies on the picture -----------------------------------------------------------------------
def test_each_grid_cell_is_the_token_of_its_pixels(bundle):
    """With no vision layers, an image token sees only its own 28x28 pixels (2x2 patches): changing the pixels of
    one cell of ``image_grid`` drawn on ``processor_view`` changes that cell's row-major token and no other."""
    local = variant(bundle, vision_layers=0)
    backbone = get_backbone(local.model)
    image = make_test_image((112, 112), seed=3)
    base = encode(local, [image])
    grid = backbone.image_grid(base, 0)
    view = backbone.processor_view(local.processor.image_processor, image, base, 0)
    assert grid == (4, 4) and view.size == (112, 112)
    with torch.no_grad():
        reference = backbone.embed(base["input_ids"], base).embeds[0, base["input_ids"][0] == local.image_token_id]
    for cell in (0, 6, 9, 15):
        x0, y0, x1, y1 = patch_grid_boxes(view.size, grid)[cell]
        pixels = np.asarray(view).copy()
        pixels[y0 + 4:y1 - 4, x0 + 4:x1 - 4] = 255 - pixels[y0 + 4:y1 - 4, x0 + 4:x1 - 4]
        changed = encode(local, [Image.fromarray(pixels)])
        with torch.no_grad():
            rows = backbone.embed(changed["input_ids"], changed).embeds[0, changed["input_ids"][0] ==
                                                                      local.image_token_id]
        moved = ((rows - reference).abs().amax(-1) > 1e-4).nonzero().flatten().tolist()
        assert moved == [cell]


@pytest.mark.parametrize("size", [(96, 48), (40, 70)])
def test_processor_view_is_what_the_processor_feeds_the_model(bundle, size):
    image = make_test_image(size, seed=3)
    encoded = encode(bundle, [image])
    image_processor = bundle.processor.image_processor
    fed = unnormalise(encoded["pixel_values"][0], image_processor)
    view = np.asarray(get_backbone(bundle.model).processor_view(image_processor, image, encoded, 0)).astype(float)
    assert view.shape == fed.shape
    assert np.abs(view - fed).max() < 0.01


def test_tiled_images_run_through_the_chain_but_are_not_drawn(bundle):
    """Asked to tile, every tile's rows are selectable and the cached chain still equals the recompute reference;
    drawing such a sample on one grid is refused."""
    inputs = encode(bundle, [make_test_image((56, 168), seed=2)], crop_to_patches=True)
    n_tiles = inputs["pixel_values"].shape[0]
    assert n_tiles > 1
    latent = torch.full((1, 2), bundle.latent_token_id)
    batch = {"input_ids": torch.cat([inputs["input_ids"], latent], 1),
             "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 2, dtype=torch.long),
             "pixel_values": inputs["pixel_values"]}
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4)
    with torch.no_grad():
        engine.recompute = False
        cached = engine(**batch)
        engine.recompute = True
        reference = engine(**batch)
    assert (cached.logits - reference.logits).abs().max() < 1e-4
    assert [s.tolist() for s in cached.selected[0]] == [s.tolist() for s in reference.selected[0]]
    assert max(max(s.tolist()) for s in cached.selected[0]) < TOKENS_PER_TILE * n_tiles
    with pytest.raises(NotImplementedError, match="tile"):
        engine.image_grid(batch, 0)


# ---- engine behaviour specific to this family ----------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_internvl3_qwen2_decoder_cached_matches_recompute(bundle, attn):
    """InternVL3 checkpoints carry a Qwen2 decoder: the cached chain equals the recompute reference there too."""
    qwen2 = variant(bundle, text_model_type="qwen2", attn_implementation=attn)
    assert all(isinstance(m, Qwen2Attention) for m in get_backbone(qwen2.model).attention_modules())
    engine = IVTLR(qwen2.model, qwen2.latent_token_id, num_selected_patches=4, latent_grad="full")
    batch = make_batch(qwen2, [SampleSpec(QUESTION, 3), SampleSpec("Count?", 2, image_size=(84, 56), seed=4)])
    cached, cached_grads = _step(engine, batch, recompute=False)
    ref, ref_grads = _step(engine, batch, recompute=True)
    assert (cached.logits - ref.logits).abs().max() < 1e-4
    for b in range(2):
        assert [s.tolist() for s in cached.selected[b]] == [s.tolist() for s in ref.selected[b]]
    _assert_grads_close(cached_grads, ref_grads, rel=1e-3)
