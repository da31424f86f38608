"""``ivtlr infer``: the printed answer, and a picture whose outlined cells are exactly the selected patches."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixture_processor import IMAGE_SIZE, QWEN_FIXTURE, base_with_processor
from ivtlr import IVTLR
from ivtlr.checkpoint import latest_checkpoint
from ivtlr.loading import load_checkpoint
from ivtlr.cli import main
from ivtlr.data import Example, build_generation_batch
from ivtlr.evaluation.explain import OUTLINE_PX, STEP_PALETTE, patch_grid_boxes
from ivtlr.backbones import get_backbone
from ivtlr.backbones import load_processor
from ivtlr.evaluation.answers import extract_answer
from ivtlr.testing import build_tiny, make_test_image
from schema_files import digit_image, write_m3cot_files
from train_runs import train_in_process, write_config

QUESTION = "Which digit is written in the image?"
CHOICES = ["one", "three", "seven", "nine"]
K, N_LATENT = 4, 3


def ring(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """The outermost OUTLINE_PX pixels inside ``box``."""
    x0, y0, x1, y1 = box
    outer, inner = np.zeros(shape, bool), np.zeros(shape, bool)
    outer[y0:y1, x0:x1] = True
    inner[y0 + OUTLINE_PX:y1 - OUTLINE_PX, x0 + OUTLINE_PX:x1 - OUTLINE_PX] = True
    return outer & ~inner


def assert_outlines(picture: Path, side: int, grid: tuple[int, int], selected: list[list[int]]) -> None:
    """Each selected cell carries its step's outline colour; no other cell has any step colour at its border.
    The image's cells are at least 24 px, so the picture is drawn at scale 1 with the legend below it."""
    drawn = np.asarray(Image.open(picture).convert("RGB"))[:side, :side]
    step_of = {index: step for step, indices in enumerate(selected) for index in indices}
    for index, box in enumerate(patch_grid_boxes((side, side), grid)):
        pixels = drawn[ring(drawn.shape[:2], box)]
        if index in step_of:
            assert (pixels == STEP_PALETTE[step_of[index]]).all(), index
        else:
            assert not any((pixels == color).all(-1).any() for color in STEP_PALETTE), index


def printed_lines(text: str, choices: list[str]) -> list[str]:
    """What the command prints for a generated ``text``."""
    answer = extract_answer(text, choices)
    return [f"generated: {text}", f"answer: {answer or 'none'}" + (f" ({choices['ABCD'.index(answer)]})"
                                                                   if answer else "")]


@pytest.mark.skipif(not QWEN_FIXTURE.is_dir(), reason="original-code fixtures not found")
def test_infer_prints_the_answer_and_draws_the_selected_patches(tmp_path, capsys):
    base = base_with_processor(tmp_path / "base")
    state = QWEN_FIXTURE / "ivtlr_state.pth"
    image_path, picture = tmp_path / "digit.png", tmp_path / "explain.png"
    digit_image(1003, size=56).save(image_path)  # grey: no outline colour occurs in it
    assert main(["infer", "--original", str(state), "--base", str(base), "--num-selected-patches", str(K),
                 "--image", str(image_path), "--question", QUESTION, "--choices", *CHOICES,
                 "--image-size", str(IMAGE_SIZE), "--max-new-tokens", "6", "--explain", str(picture)]) == 0

    # The same question through the engine directly: its forward pass says which patches each step inserted.
    engine = IVTLR.from_original(base, state, num_selected_patches=K)
    processor = load_processor(str(base), "qwen2_vl")
    example = Example("q", Image.open(image_path).convert("RGB"), QUESTION, CHOICES, "A", "")
    batch = build_generation_batch(processor, [example], N_LATENT, engine.latent_token_id, image_size=IMAGE_SIZE)
    with torch.no_grad():
        selected = [step.tolist() for step in engine(**batch).selected[0]]
        generated = engine.generate(**batch, max_new_tokens=6)[0]
    text = processor.tokenizer.decode(generated.tolist(), skip_special_tokens=True)
    assert capsys.readouterr().out.splitlines()[-2:] == printed_lines(text, CHOICES)

    grid = engine.image_grid(batch, 0)
    assert grid == (4, 4) and [len(s) for s in selected] == [K] * N_LATENT
    assert_outlines(picture, IMAGE_SIZE, grid, selected)


def test_infer_from_a_trained_checkpoint(tmp_path, capsys, caplog):
    """--checkpoint: the run's last stage sets the latent steps and the image size."""
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=1)
    checkpoint = latest_checkpoint(train_in_process(write_config(tmp_path, files, num_epochs=2)) / "checkpoints")
    image_path, picture = tmp_path / "digit.png", tmp_path / "explain.png"
    digit_image(1001, size=40).save(image_path)
    assert main(["infer", "--checkpoint", str(checkpoint), "--image", str(image_path), "--question", QUESTION,
                 "--choices", *CHOICES, "--max-new-tokens", "5", "--explain", str(picture)]) == 0

    engine, components, meta = load_checkpoint(checkpoint)
    example = Example("q", Image.open(image_path).convert("RGB"), QUESTION, CHOICES, "A", "")
    batch = build_generation_batch(components.processor, [example], meta.n_latent, engine.latent_token_id,
                                   image_size=meta.image_size)
    out = engine.generate(**batch, max_new_tokens=5, return_dict=True)
    text = components.tokenizer.decode(out.sequences[0, : out.lengths[0]].tolist(), skip_special_tokens=True)
    assert capsys.readouterr().out.splitlines()[-2:] == printed_lines(text, CHOICES)
    selected = [step.tolist() for step in out.selected[0]]
    assert meta.image_size == 56 and [len(s) for s in selected] == [meta.num_selected_patches] * meta.n_latent == [2]
    assert_outlines(picture, meta.image_size, engine.image_grid(batch, 0), selected)

    # A picture that cannot be written (its folder is a file) costs a warning, not the answer.
    unwritable = picture / "steps.png"
    with caplog.at_level(logging.WARNING, logger="ivtlr.evaluation.infer"):
        assert main(["infer", "--checkpoint", str(checkpoint), "--image", str(image_path), "--question", QUESTION,
                     "--choices", *CHOICES, "--max-new-tokens", "5", "--explain", str(unwritable)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == printed_lines(text, CHOICES)
    assert any("could not write the --explain picture" in r.getMessage() for r in caplog.records)
    assert not unwritable.exists()


def unnormalise(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """(3, H, W) normalised pixels back to 0..255 RGB (H, W, 3)."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    return ((pixels.float() * std + mean) / image_processor.rescale_factor).permute(1, 2, 0).numpy()


def qwen_pixels(encoded: dict, image_processor) -> np.ndarray:
    """Undo Qwen2-VL's patch flattening: (t*h*w, C*T*p*p) merge-block-ordered rows -> the (H, W, 3) picture."""
    t, h, w = encoded["image_grid_thw"][0].tolist()
    m, p, tp = image_processor.merge_size, image_processor.patch_size, image_processor.temporal_patch_size
    rows = encoded["pixel_values"].reshape(t, h // m, w // m, m, m, 3, tp, p, p)
    frames = rows.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, 3, h * p, w * p)
    return unnormalise(frames[0], image_processor)


@pytest.mark.parametrize("family", ["qwen2_vl", "chameleon"])
@pytest.mark.parametrize("size", [(96, 48), (40, 70)])
def test_processor_view_is_what_the_processor_feeds_the_model(family, size):
    """The drawn picture is the processor's own resized (and cropped) image, pixel for pixel."""
    bundle = build_tiny(family)
    image = make_test_image(size, seed=3)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = bundle.processor(text=[text], images=[image], return_tensors="pt")
    image_processor = bundle.processor.image_processor
    if family == "chameleon":
        fed = unnormalise(encoded["pixel_values"][0], image_processor)
    else:
        fed = qwen_pixels(encoded, image_processor)
    backbone = get_backbone(bundle.model)
    view = np.asarray(backbone.processor_view(image_processor, image, encoded, 0)).astype(float)
    assert view.shape == fed.shape
    assert np.abs(view - fed).max() < 0.01


@pytest.mark.parametrize(("option", "value"), [("--max-new-tokens", "-5"), ("--max-new-tokens", "0"),
                                               ("--n-latent", "-1"), ("--image-size", "0")])
def test_out_of_range_options_stop_before_loading_anything(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        main(["infer", "--checkpoint", str(tmp_path / "not-there"), "--image", "x.png", "--question", "q",
              "--choices", "a", "b", option, value])
    assert stop.value.code == 2 and f"argument {option}: must be at least" in capsys.readouterr().err


def test_infer_reads_each_latent_back_as_text(tmp_path, capsys):
    """--read-latents prints what each latent step's state decodes to on its own: the text of a greedy decode of
    the fed row run here by hand (the model's own forward, no cache), cut at its first newline."""
    files = write_m3cot_files(tmp_path / "data", n_train=4, n_test=1)
    checkpoint = latest_checkpoint(train_in_process(write_config(tmp_path, files, num_epochs=2)) / "checkpoints")
    image_path, picture = tmp_path / "digit.png", tmp_path / "explain.png"
    digit_image(1001, size=40).save(image_path)
    assert main(["infer", "--checkpoint", str(checkpoint), "--image", str(image_path), "--question", QUESTION,
                 "--choices", *CHOICES, "--max-new-tokens", "5", "--read-latents", "--explain", str(picture)]) == 0
    printed = capsys.readouterr().out.splitlines()

    engine, components, meta = load_checkpoint(checkpoint)
    example = Example("q", Image.open(image_path).convert("RGB"), QUESTION, CHOICES, "A", "")
    batch = build_generation_batch(components.processor, [example], meta.n_latent, engine.latent_token_id,
                                   image_size=meta.image_size)
    model = engine.base_model
    expected = []
    with torch.no_grad():
        rows = engine.generate(**batch, max_new_tokens=5, return_dict=True).latents[0]
        for row in rows:
            inputs, tokens = row[None, None], []
            for _ in range(16):
                token = int(model(inputs_embeds=inputs).logits[0, -1].argmax())
                if token in engine.eos_token_ids:
                    break
                tokens.append(token)
                inputs = torch.cat([inputs, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
            text = components.tokenizer.decode(tokens, skip_special_tokens=True)
            expected.append(text.split("\n", 1)[0].strip())
    assert len(expected) == meta.n_latent >= 1
    assert printed[:len(expected)] == [f"latent step {i + 1} says: {t}" for i, t in enumerate(expected)]
    assert picture.stat().st_size > 0
