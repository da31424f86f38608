"""LLaVA-OneVision: anyres packing (base view + unpadded tile grid + newline separators), which rows are selectable,
the grid ``--explain`` draws on and the picture it draws, the hub's anyres settings. The checks every family passes
(the CLI end to end, the released processor without torchvision, stage zero) are in ``tests/test_families.py``.

Every check compares with an independent computation: the transformers model's own embeddings and logits, its
``pack_image_features`` applied to features that carry their own (view, row, column), the processor's pixel values,
the recompute path and a batch of one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil

from engine_inputs import SampleSpec, make_batch
import ivtlr
from ivtlr import IVTLR
from ivtlr.backbones import get_backbone, load_processor
from ivtlr.backbones.llava_onevision.geometry import anyres_layout
from ivtlr.backbones.llava_onevision.processor import ImageOnlyLlavaOnevisionProcessor
from ivtlr.config import load_config
from ivtlr.data import Example, IVTLRCollator, TrainingItem, build_generation_batch, format_prompt_text
from ivtlr.evaluation.explain import MIN_CELL_PX, STEP_PALETTE, save_selection_png
from ivtlr.evaluation.infer import answer_question
from ivtlr.testing import build_tiny, build_tokenizer, make_test_image
from schema_files import digit_image
from test_infer import ring, unnormalise
from train_runs import REPO

FAMILY = "llava_onevision"
QUESTION = "Which digit is written in the top left corner of this image?"
PATCH = 14


@pytest.fixture(scope="module")
def bundle():
    return build_tiny(FAMILY)


def _prompt(bundle, question: str = QUESTION) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _encode(bundle, image: Image.Image, question: str = QUESTION) -> dict:
    return dict(bundle.processor(text=[_prompt(bundle, question)], images=[image], return_tensors="pt"))


def _vision(encoded: dict) -> dict:
    return {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}


def packed_coordinates(model, encoded: dict) -> list[tuple[int, int, int] | None]:
    """What ``pack_image_features`` makes of features that carry their own (view, row, column): one entry per
    ``<image>`` token of the (single) image, None at the newline separators. Independent of the adapter."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    views = encoded["pixel_values"].shape[1]
    grid = torch.stack(torch.meshgrid(torch.arange(views), torch.arange(side), torch.arange(side), indexing="ij"), -1)
    features = grid.reshape(views, side * side, 3).float()
    (packed,), _ = model.model.pack_image_features([features], encoded["image_sizes"],
                                                   image_newline=torch.full((3,), -1.0),
                                                   vision_aspect_ratio=config.vision_aspect_ratio)
    return [None if row[0] < 0 else tuple(int(v) for v in row) for row in packed]


def patch_pixels(encoded: dict, image_processor, view: int, row: int, col: int) -> np.ndarray:
    """The processor's pixels of one patch, back in 0..255 RGB."""
    pixels = encoded["pixel_values"][0, view, :, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
    return unnormalise(pixels, image_processor)


# ------------------------------------------------------------------------------------------------ tiny model
def test_tiny_model_settings(bundle):
    config, tokenizer, processor = bundle.model.config, bundle.tokenizer, bundle.processor
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size) == (32, 2, 2, 14, 56)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == \
        (64, 2, 4, 2)
    assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("full", -1)
    assert processor.vision_feature_select_strategy == "full" and processor.num_image_tokens == 16
    assert config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == [[56, 56]]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<video>")
    assert (text.eos_token_id, text.pad_token_id) == tuple(tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]))
    backbone = get_backbone(bundle.model)
    assert backbone.default_num_selected_patches == 32 and backbone.position_rows == 1
    assert backbone.decoder() is bundle.model.model.language_model
    assert _prompt(bundle, "Hi?") == "<|im_start|>user <image>\nHi?<|im_end|><|im_start|>assistant\n"


def test_processor_expands_image_into_base_view_tiles_and_newlines(bundle):
    """56x56: 4x4 base view + 4x4 tile with a newline after each row = 36 tokens, and the model's packing agrees
    for every shape (unpadded rows or columns for wide and tall pictures)."""
    for size, count in [((56, 56), 16 + 4 * 5), ((84, 56), 16 + 2 * 5), ((56, 84), 16 + 4 * 3), ((112, 112), 36)]:
        encoded = _encode(bundle, make_test_image(size))
        assert tuple(encoded["pixel_values"].shape) == (1, 2, 3, 56, 56)
        assert encoded["image_sizes"].tolist() == [[size[1], size[0]]] and encoded["batch_num_images"].tolist() == [1]
        assert int((encoded["input_ids"] == bundle.image_token_id).sum()) == count
        assert len(packed_coordinates(bundle.model, encoded)) == count


# ------------------------------------------------------------------------------------------------ embeddings
def stock_inputs_embeds(model, encoded: dict) -> torch.Tensor:
    """The embeddings the transformers model itself hands its decoder."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**encoded)
    finally:
        handle.remove()
    return captured["embeds"]


def assert_newline_rows_are_not_selectable(model, encoded: dict) -> None:
    """The adapter's embeddings are the model's; its image mask is the ``<image>`` rows minus the newline rows."""
    backbone = get_backbone(model)
    with torch.no_grad():
        embedded = backbone.embed(encoded["input_ids"], _vision(encoded))
    stock = stock_inputs_embeds(model, encoded)
    assert torch.equal(embedded.embeds, stock)
    placeholders = encoded["input_ids"][0] == model.config.image_token_id
    selectable = torch.tensor([c is not None for c in packed_coordinates(model, encoded)])
    expected = placeholders.clone()
    expected[placeholders] = selectable
    assert torch.equal(embedded.image_mask[0], expected)
    rows, newline = stock[0, placeholders], model.model.image_newline
    assert int((~selectable).sum()) > 0
    assert torch.equal(rows[~selectable], newline.expand(int((~selectable).sum()), -1))
    assert not (rows[selectable] == newline).all(-1).any()


@pytest.mark.parametrize("size", [(56, 56), (84, 56), (56, 84), (40, 40)])
def test_embeddings_are_the_models_and_newline_rows_are_not_selectable(bundle, size):
    assert_newline_rows_are_not_selectable(bundle.model, _encode(bundle, make_test_image(size, seed=2)))


PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [224, 224]]


@pytest.mark.parametrize("size", [(112, 112), (112, 56), (224, 224)], ids=["2x2-tiles", "1x2-tiles", "resampled"])
def test_multi_tile_and_resampled_packing(size):
    """Several tiles, and a 4x4-tile grid that ``anyres_max_9`` resamples to 12x12: embeddings and mask still follow
    the model; the views cannot be one grid, which image_grid / processor_view say instead of drawing wrongly."""
    bundle = build_tiny(FAMILY)
    bundle.model.config.image_grid_pinpoints = PINPOINTS
    bundle.processor.image_processor.image_grid_pinpoints = PINPOINTS
    image = make_test_image(size, seed=4)
    encoded = _encode(bundle, image)
    assert encoded["pixel_values"].shape[1] > 2
    assert_newline_rows_are_not_selectable(bundle.model, encoded)
    backbone = get_backbone(bundle.model)
    with pytest.raises(ValueError, match="do not stack into one patch grid"):
        backbone.image_grid(_vision(encoded), 0)
    with pytest.raises(ValueError, match="do not stack into one patch grid"):
        backbone.processor_view(bundle.processor.image_processor, image, _vision(encoded), 0)


# ------------------------------------------------------------------------------------------------ the drawn grid
@pytest.mark.parametrize("size", [(56, 56), (84, 56), (70, 42), (40, 40), (112, 112)])
def test_grid_cells_show_the_patches_of_their_tokens(bundle, size):
    """Cell i of image_grid on processor_view holds exactly the pixels the i-th selectable token was computed from
    (its view and patch taken from the model's packing, its pixels from the processor's pixel_values)."""
    image = make_test_image(size, seed=3)
    encoded = _encode(bundle, image)
    backbone, image_processor = get_backbone(bundle.model), bundle.processor.image_processor
    rows, cols = backbone.image_grid(_vision(encoded), 0)
    view = np.asarray(backbone.processor_view(image_processor, image, _vision(encoded), 0)).astype(float)
    assert view.shape == (rows * PATCH, cols * PATCH, 3)
    patches = [c for c in packed_coordinates(bundle.model, encoded) if c is not None]
    assert len(patches) == rows * cols
    assert {v for v, _, _ in patches} == {0, 1}
    for index, (v, r, c) in enumerate(patches):
        y, x = divmod(index, cols)
        cell = view[y * PATCH:(y + 1) * PATCH, x * PATCH:(x + 1) * PATCH]
        assert np.abs(cell - patch_pixels(encoded, image_processor, v, r, c)).max() < 0.01, (index, v, r, c)
    if size[0] > size[1]:
        assert rows < 2 * cols  # a wide picture keeps fewer tile rows after unpadding


def test_tall_pictures_are_refused_with_a_clear_error(bundle):
    """A tall picture's tile grid loses columns, so base view and tiles cannot share one grid."""
    image = make_test_image((56, 84), seed=1)
    encoded = _encode(bundle, image)
    backbone = get_backbone(bundle.model)
    with pytest.raises(ValueError, match=r"56x84 image .* 4x2 tile grid.*square"):
        backbone.image_grid(_vision(encoded), 0)
    with pytest.raises(ValueError, match="the processor saw 56x84"):
        backbone.processor_view(bundle.processor.image_processor, image.resize((56, 56)), _vision(encoded), 0)


# ------------------------------------------------------------------------------------------------ engine
def test_latent_vision_selects_and_inserts_only_patch_rows(bundle):
    """K=20 over 32 selectable rows (36 <image> rows): 20 then the 12 left, never a newline row; each inserted row
    is the model's embedding of the selected patch token."""
    batch = make_batch(bundle, [SampleSpec(QUESTION, 2)])
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=20)
    with torch.no_grad():
        out = engine(**batch)
        ref = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=20, recompute=True)(**batch)
    selected = [s.tolist() for s in out.selected[0]]
    assert selected == [s.tolist() for s in ref.selected[0]]
    assert [len(s) for s in selected] == [20, 12] and sorted(sum(selected, [])) == list(range(32))
    assert (out.logits - ref.logits).abs().max() < 1e-4

    prompt = {k: v[:, : int((batch["labels"][0] == -100).sum()) - 2] if k in ("input_ids", "attention_mask") else v
              for k, v in batch.items() if k != "labels"}
    stock = stock_inputs_embeds(bundle.model, prompt)[0]
    placeholders = prompt["input_ids"][0] == bundle.image_token_id
    keep = torch.tensor([c is not None for c in packed_coordinates(bundle.model, prompt)])
    patch_rows = stock[placeholders][keep]
    for step, latent_at in zip(selected, out.latent_positions[0]):
        inserted = out.inputs_embeds[0, latent_at - len(step):latent_at]
        assert torch.equal(inserted, patch_rows[step])
        assert not (inserted == bundle.model.model.image_newline).all(-1).any()


def test_collated_batches_carry_image_sizes_and_equal_batches_of_one(bundle):
    """The data collator concatenates pixel_values (n, 2 views, C, H, W), image_sizes and batch_num_images along
    dim 0; pictures of different shapes give different token counts but the same view count."""
    prompt = format_prompt_text("Which digit is written in the image?", ["zero", "one", "two"])
    items = [TrainingItem("a", make_test_image((56, 56), seed=1), prompt, 2, "Therefore, the answer is A"),
             TrainingItem("b", make_test_image((84, 56), seed=2), prompt, 1, "It bends.\nTherefore, the answer is B"),
             TrainingItem("c", make_test_image((40, 70), seed=3), prompt, 0, "Therefore, the answer is C")]
    collator = IVTLRCollator(bundle.processor, bundle.latent_token_id)
    batch = collator(items)
    singles = [collator([item]) for item in items]
    assert tuple(batch["pixel_values"].shape) == (3, 2, 3, 56, 56)
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert torch.equal(batch[key], torch.cat([single[key] for single in singles])), key
    assert batch["image_sizes"].tolist() == [[56, 56], [56, 84], [70, 40]]
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=3)
    with torch.no_grad():
        out = engine(**batch)
        for i, single in enumerate(singles):
            alone = engine(**single)
            length = alone.logits.shape[1]
            assert (out.logits[i, :length] - alone.logits[0]).abs().max() < 1e-4, i
            assert [s.tolist() for s in out.selected[i]] == [s.tolist() for s in alone.selected[0]], i


# ------------------------------------------------------------------------------------------------ files
def test_hub_anyres_settings_reach_the_loaded_processor(tmp_path):
    """A llava-hf layout's anyres settings (pinpoints, tokens per view, feature strategy) reach the family's loader:
    ``<image>`` expands into the base view and a 2x2 tile grid. (Loading without torchvision, whatever the hub
    names, is checked for every family in tests/test_families.py.)"""
    build_tokenizer(FAMILY).save_pretrained(tmp_path)
    image_config = {"image_processor_type": "LlavaOnevisionImageProcessor",
                    "processor_class": "LlavaOnevisionProcessor", "size": {"height": 56, "width": 56},
                    "image_grid_pinpoints": PINPOINTS[:4], "do_pad": True, "image_mean": [0.5] * 3,
                    "image_std": [0.5] * 3, "resample": 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_config))
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16, "vision_feature_select_strategy": "full",
         "vision_aspect_ratio": "anyres_max_9"}))
    processor = load_processor(str(tmp_path), FAMILY)
    assert (processor.num_image_tokens, processor.vision_feature_select_strategy) == (16, "full")
    encoded = processor(text=["<image>x"], images=[make_test_image((112, 112), seed=5)], return_tensors="pt")
    assert tuple(encoded["pixel_values"].shape) == (1, 5, 3, 56, 56)  # base view + 2x2 tiles
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) == 16 + 8 * 9


def test_legacy_key_renames_reach_every_weight(bundle):
    """transformers 4.51 names (tower, projector and newline at the top, the decoder inside ``language_model``)
    map onto today's layout."""
    def old_name(key: str) -> str:
        if key.startswith("lm_head."):
            return "language_model." + key
        if key.startswith("model.language_model."):
            return "language_model.model." + key[len("model.language_model."):]
        return key[len("model."):]

    current = list(bundle.model.state_dict())
    assert "model.image_newline" in current
    backbone = get_backbone(bundle.model)
    assert [backbone.rename_legacy_key(old_name(key)) for key in current] == current


def test_config_file_is_the_qwen2_vl_recipe_on_llava_onevision():
    """Every key of the Qwen2-VL M3CoT config, with LLaVA-OneVision-7B, K = 32 and its 384 px view: for the released
    settings (SigLIP 384/14, 36 pinpoints, anyres_max_9) one base view and one tile, 1485 <image> tokens of which
    27 newline separators, so 54 x 27 selectable patches in one grid."""
    config = load_config(REPO / "configs" / "llava_onevision_m3cot.yaml")
    qwen2 = load_config(REPO / "configs" / "qwen2vl_m3cot.yaml")
    assert (config.model, config.num_selected_patches, config.image_size) == \
        ("llava-hf/llava-onevision-qwen2-7b-ov-hf", 32, 384)
    assert config.name == "llava_onevision_m3cot"
    assert {key for key, value in vars(config).items() if vars(qwen2)[key] != value} == {"model", "image_size", "name"}

    released = LlavaOnevisionConfig()
    tower = released.vision_config
    layout = anyres_layout((384, 384), released.image_grid_pinpoints, tower.image_size, tower.patch_size,
                           released.vision_aspect_ratio)
    assert layout.single_grid and (layout.side + layout.rows, layout.side) == (54, 27)
    processor = ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionImageProcessorPil(), build_tokenizer(FAMILY),
                                                 num_image_tokens=729, vision_feature_select_strategy="full")
    encoded = processor(text=["<image>x"], images=[make_test_image((384, 384))], return_tensors="pt")
    assert int((encoded["input_ids"] == processor.image_token_id).sum()) == 1485 == 54 * 27 + 27


# ------------------------------------------------------------------------------------------------ --explain
def assert_outlines_on_views(picture: Path, model, batch: dict, selected: list[list[int]]) -> None:
    """Each selected token's patch, located independently (its view and patch from the model's packing; the base
    view on top, the tile's kept rows below it), carries its step's outline colour; no other patch has any."""
    patches = [c for c in packed_coordinates(model, batch) if c is not None]
    assert {v for v, _, _ in patches} == {0, 1}  # one base view, one tile
    side = model.config.vision_config.image_size
    tile_top = min(r for v, r, _ in patches if v == 1)
    scale = math.ceil(MIN_CELL_PX / PATCH)
    drawn = np.asarray(Image.open(picture).convert("RGB"))
    step_of = {index: step for step, indices in enumerate(selected) for index in indices}
    assert len(step_of) == sum(len(s) for s in selected)  # no patch twice: one outline per cell
    for index, (v, r, c) in enumerate(patches):
        x0, y0 = c * PATCH, r * PATCH if v == 0 else side + (r - tile_top) * PATCH
        box = (x0 * scale, y0 * scale, (x0 + PATCH) * scale, (y0 + PATCH) * scale)
        pixels = drawn[ring(drawn.shape[:2], box)]
        if index in step_of:
            assert (pixels == STEP_PALETTE[step_of[index]]).all(), index
        else:
            assert not any((pixels == color).all(-1).any() for color in STEP_PALETTE), index


def test_explain_outlines_the_selected_patches_on_their_views(tmp_path):
    """What ``ivtlr infer --explain`` draws (the command runs for every family in tests/test_families.py), located
    independently: each selected token's patch, from the model's packing, on the base view on top or the tile's kept
    rows below it, carries its step's outline colour; no other patch has any."""
    model = ivtlr.load(f"tiny:{FAMILY}", num_selected_patches=2, image_size=56)
    image = digit_image(1001, size=40)  # grey: no outline colour occurs in it
    question, choices = "Which digit is written in the image?", ["one", "three", "seven", "nine"]
    result = answer_question(model, image, question, choices, n_latent=3, max_new_tokens=2)
    picture = save_selection_png(tmp_path / "explain.png", result.seen_image, result.grid_hw, result.selected)
    batch = build_generation_batch(model.processor, [Example("q", image, question, choices, "A", "")], 3,
                                   model.latent_token_id, image_size=56)
    assert result.grid_hw == (8, 4) and [len(s) for s in result.selected] == [2, 2, 2]
    assert_outlines_on_views(picture, model.engine.backbone.model, batch, result.selected)
