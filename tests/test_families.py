"""Every registered family through the same checks: a family's registry line (``ivtlr.testing.FAMILIES``) is all it
takes to be enrolled, and nothing here names a family.

* the CLI chain on a tiny model: ``ivtlr train`` through curriculum stages 0..3 (LoRA on the language model's
  attention), ``ivtlr eval`` on the last checkpoint, ``ivtlr infer --explain``;
* the family's processor loads a released layout (the torchvision image processor named, a video processor shipped)
  without torchvision;
* stage zero (no latent slot) is the transformers model's own forward: logits, loss and rotary positions.

Where a family cannot run a check, what it declares (its backbone's ``position_rows``, transformers' processor
classes for its model type) decides. What only one family does is tested in ``tests/test_backbone_<family>.py``.
"""
from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.backbones import Backbone, get_backbone, load_processor, tiny_spec
from ivtlr.checkpoint import checkpoint_dirs
from ivtlr.cli import main
from ivtlr.data import Example, build_generation_batch, load_examples, resize_image
from ivtlr.data.collate import TOKEN_TYPE_KEYS
from ivtlr.evaluation.explain import MIN_CELL_PX, STEP_PALETTE, patch_grid_boxes
from ivtlr.loading import load_checkpoint
from ivtlr.testing import FAMILIES, TinyBundle, build_tiny, make_test_image
from schema_files import digit_image, write_m3cot_files
from test_eval import decode, run_eval
from test_infer import printed_lines, ring
from train_runs import checkpoint_weights, metrics, one_thread, train_in_process, write_config

QUESTION = "Which digit is written in the top left corner of this image?"
CHOICES = ["one", "three", "seven", "nine"]
K, N_LATENT, N_TEST, MAX_NEW_TOKENS = 2, 3, 3, 5


@pytest.fixture(scope="module", autouse=True)
def single_thread_module():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def bundle(family) -> TinyBundle:
    return build_tiny(family)


# ---- the CLI chain: train stages 0..3, eval, infer --explain -------------------------------------------------------
@dataclass
class TrainedRun:
    config: Path
    data_files: dict[str, Path]
    run_dir: Path
    checkpoints: list[Path]
    image_size: int


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory) -> TrainedRun:
    """``ivtlr train`` on M3CoT-schema files, one stage per epoch (two steps each), LoRA on q/k/v projections (which
    vision towers have too), at the family's default tiny image size; one run per family, shared by the tests."""
    directory = tmp_path_factory.mktemp(f"run-{family}")
    files = write_m3cot_files(directory / "data", n_train=4, n_test=N_TEST)
    image_size = tiny_spec(family).default_image_size
    config = write_config(directory, files, model=f"tiny:{family}", image_size=image_size, num_selected_patches=K,
                          num_epochs=4, use_lora=True, lr=1e-2, lora_target_modules=["q_proj", "k_proj", "v_proj"],
                          eval={"n_latent": N_LATENT})
    run_dir = train_in_process(config)
    return TrainedRun(config, files, run_dir, checkpoint_dirs(run_dir / "checkpoints"), image_size)


def test_train_runs_stages_0_to_3_with_lora_on_the_language_model(trained):
    """One latent step more per stage, a checkpoint at each stage's end, and LoRA adapters (trained) on every
    attention layer of the language model and nowhere else."""
    records = metrics(trained.run_dir)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["latents"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3]  # one latent step per stage
    assert all(r["samples"] == 2 and r["grad_norm"] > 0 for r in records)
    assert [c.name for c in trained.checkpoints] == [f"checkpoint-{s:08d}" for s in (2, 4, 6, 8)]  # one per stage
    engine, _, meta = load_checkpoint(trained.checkpoints[-1])
    assert (meta.stage, meta.n_latent, meta.image_size, meta.weights, engine.num_selected_patches) == \
        (3, 3, trained.image_size, "lora", K)
    decoder = engine.backbone.decoder()
    prefix = next(name for name, module in engine.base_model.named_modules() if module is decoder)
    in_attention = re.compile(rf"{re.escape(prefix)}\.layers\.(\d+)\.self_attn\.[qkv]_proj\.lora_[AB]\.")
    lora = [name for name, _ in engine.base_model.named_parameters() if "lora_" in name]
    assert lora and all(in_attention.match(name) for name in lora), lora
    assert {int(in_attention.match(name)[1]) for name in lora} == set(range(len(decoder.layers)))
    saved = checkpoint_weights(trained.checkpoints[-1])
    lora_b = [name for name in saved if "lora_B" in name]
    assert lora_b and all(float(saved[name].abs().max()) > 0 for name in lora_b)  # trained: LoRA B starts at zero


def test_eval_answers_are_what_the_checkpoint_generates(trained, tmp_path):
    """``ivtlr eval`` (settings from the config file and from the command line) batches two questions at a time; each
    answer is what the loaded checkpoint generates for all the questions at once and for that question alone."""
    records, summary = run_eval(trained.config, tmp_path / "eval", "eval.batch_size=2",
                                f"eval.max_new_tokens={MAX_NEW_TOKENS}", "--checkpoint", str(trained.checkpoints[-1]))
    engine, components, meta = load_checkpoint(trained.checkpoints[-1])
    examples = list(load_examples("m3cot", "test", data_files=trained.data_files))
    assert summary["run"]["n_latent"] == N_LATENT
    assert summary["overall"]["count"] == len(records) == len(examples) == N_TEST

    def answers(batch_examples: list[Example]) -> list[str]:
        batch = build_generation_batch(components.processor, batch_examples, N_LATENT, engine.latent_token_id,
                                       image_size=meta.image_size)
        out = engine.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, return_dict=True)
        return [decode(components.tokenizer, out.sequences[b, : out.lengths[b]]) for b in range(len(batch_examples))]

    together = answers(examples)
    assert [r["messages"][1] for r in records] == together
    assert together == [answers([example])[0] for example in examples]


def assert_outlines(picture: Path, seen: Image.Image, grid: tuple[int, int], selected: list[list[int]]) -> None:
    """The picture is what the model saw, enlarged to cells of at least MIN_CELL_PX; each selected cell of ``grid``
    laid on it carries its step's outline colour, no other cell any step colour, and away from the outlines every
    pixel is the seen image's."""
    boxes = patch_grid_boxes(seen.size, grid)
    scale = math.ceil(MIN_CELL_PX / min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes))
    width, height = seen.width * scale, seen.height * scale
    drawn = np.asarray(Image.open(picture).convert("RGB"))[:height, :width]
    step_of = {index: step for step, indices in enumerate(selected) for index in indices}
    assert len(step_of) == sum(len(s) for s in selected)  # no cell twice: one outline per cell
    outlines = np.zeros(drawn.shape[:2], bool)
    for index, box in enumerate(boxes):
        cell_ring = ring(drawn.shape[:2], tuple(v * scale for v in box))
        pixels = drawn[cell_ring]
        if index in step_of:
            assert (pixels == STEP_PALETTE[step_of[index]]).all(), index
            outlines |= cell_ring
        else:
            assert not any((pixels == color).all(-1).any() for color in STEP_PALETTE), index
    enlarged = np.asarray(seen.convert("RGB").resize((width, height), Image.Resampling.NEAREST))
    assert np.array_equal(drawn[~outlines], enlarged[~outlines])


def test_infer_explain_outlines_the_selected_patches(trained, tmp_path, capsys):
    """``ivtlr infer --explain`` prints what the checkpoint generates and outlines each latent step's K patches on
    the grid of the sample's selectable image rows."""
    image_path, picture = tmp_path / "digit.png", tmp_path / "explain.png"
    digit_image(1001, size=40).save(image_path)  # grey: no outline colour occurs in it
    capsys.readouterr()
    assert main(["infer", "--checkpoint", str(trained.checkpoints[-1]), "--image", str(image_path), "--question",
                 QUESTION, "--choices", *CHOICES, "--max-new-tokens", str(MAX_NEW_TOKENS),
                 "--explain", str(picture)]) == 0
    engine, components, meta = load_checkpoint(trained.checkpoints[-1])
    example = Example("q", Image.open(image_path).convert("RGB"), QUESTION, CHOICES, "A", "")
    batch = build_generation_batch(components.processor, [example], meta.n_latent, engine.latent_token_id,
                                   image_size=meta.image_size)
    out = engine.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, return_dict=True)
    text = components.tokenizer.decode(out.sequences[0, : out.lengths[0]].tolist(), skip_special_tokens=True)
    assert capsys.readouterr().out.splitlines()[-2:] == printed_lines(text, CHOICES)

    selected = [step.tolist() for step in out.selected[0]]
    assert [len(s) for s in selected] == [K] * N_LATENT
    rows, cols = engine.image_grid(batch, 0)
    vision = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        selectable = engine.backbone.embed(batch["input_ids"], vision).image_mask[0]
    assert rows * cols == int(selectable.sum())
    seen = engine.backbone.processor_view(components.processor.image_processor,
                                          resize_image(example.image, meta.image_size), batch, 0)
    assert_outlines(picture, seen, (rows, cols), selected)


# ---- the processor of a released checkpoint, without torchvision ---------------------------------------------------
def released_layout(bundle: TinyBundle, directory: Path, image_processor_type: str, layout: str) -> Path:
    """The tiny processor saved as a released checkpoint of its model type ships it: the stock processor class and
    the torchvision image processor named, and a video processor config where the stock processor has one; either
    in one ``processor_config.json`` (transformers 5) or in the separate files of hub repositories."""
    bundle.processor.save_pretrained(directory)
    saved = json.loads((directory / "processor_config.json").read_text())
    stock = PROCESSOR_MAPPING_NAMES.get(bundle.family) or next(
        cls.__name__ for cls in type(bundle.processor).__mro__ if cls.__module__.startswith("transformers."))
    saved["processor_class"] = stock
    image = {**saved.pop("image_processor"), "image_processor_type": image_processor_type}
    parts = {"image_processor": image}
    if "video_processor" in inspect.signature(getattr(transformers, stock)).parameters:
        parts["video_processor"] = {"video_processor_type": stock.removesuffix("Processor") + "VideoProcessor"}
    if layout == "processor_config":
        (directory / "processor_config.json").write_text(json.dumps({**saved, **parts}))
        return directory
    (directory / "processor_config.json").unlink()
    if saved.keys() != {"processor_class"}:  # processor settings beside the class name
        (directory / "processor_config.json").write_text(json.dumps(saved))
    (directory / "preprocessor_config.json").write_text(json.dumps({**image, "processor_class": stock}))
    if "video_processor" in parts:
        (directory / "video_preprocessor_config.json").write_text(
            json.dumps({**parts["video_processor"], "processor_class": stock}))
    return directory


def encode(processor, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True))


def assert_same_encoding(processor, reference) -> None:
    images = [make_test_image((200, 60), seed=1), make_test_image((56, 84), seed=2)]
    got, expected = encode(processor, images), encode(reference, images)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("layout", ["processor_config", "separate_files"])
def test_released_processor_layout_loads_without_torchvision(bundle, layout, tmp_path):
    """The family's loader builds its own processor class with the PIL image processor (legacy ``...Fast`` names
    too), no video processor, and the tiny processor's chat template and encodings; saved again, it reloads the
    same."""
    classes = IMAGE_PROCESSOR_MAPPING_NAMES.get(bundle.family) or {}
    if not classes.get("torchvision"):
        pytest.skip(f"transformers has no torchvision image processor for {bundle.family}: none to load without")
    torchvision_class = classes["torchvision"]
    assert type(bundle.processor.image_processor).__name__ == classes["pil"]
    for named in (torchvision_class, torchvision_class + "Fast"):
        directory = released_layout(bundle, tmp_path / named, named, layout)
        processor = load_processor(str(directory), bundle.family)
        assert type(processor) is type(bundle.processor)
        assert type(processor.image_processor) is type(bundle.processor.image_processor)
        assert getattr(processor, "video_processor", None) is None
        assert processor.chat_template == bundle.processor.chat_template
        assert_same_encoding(processor, bundle.processor)

    processor.save_pretrained(tmp_path / "saved")
    assert_same_encoding(load_processor(str(tmp_path / "saved"), bundle.family), processor)


# ---- stage zero is the transformers forward ------------------------------------------------------------------------
@contextmanager
def recorded_positions(decoder) -> Iterator[list[torch.Tensor]]:
    """The position ids the decoder's rotary embedding receives, call by call."""
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).clone())

    rotary = next(module for name, module in decoder.named_modules() if name.endswith("rotary_emb"))
    handle = rotary.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def transformers_inputs(bundle: TinyBundle, backbone: Backbone, batch: dict, positions: str) -> dict:
    """What the transformers model needs beside ``batch`` to use the positions the engine's mode means: for 'mrope'
    the processor's token types (1 at image tokens), from which it computes its own multimodal positions; for
    'original' on a model with several position rows, the plain range on every row."""
    if positions == "mrope":
        emitted = encode(bundle.processor, [make_test_image()]).keys()
        return {key: (batch["input_ids"] == bundle.image_token_id).int() for key in TOKEN_TYPE_KEYS if key in emitted}
    if backbone.position_rows > 1:
        batch_size, length = batch["input_ids"].shape
        return {"position_ids": torch.arange(length).expand(backbone.position_rows, batch_size, length)}
    return {}


@pytest.mark.parametrize("positions", ["original", "mrope"])
def test_stage_zero_is_the_transformers_forward(bundle, positions):
    """No latent slot: the engine's logits, loss and rotary positions are the transformers model's own, for one
    prompt and for two right-padded prompts of different lengths and image shapes. A family with one position row
    has no multimodal rotary positions: it refuses 'mrope'."""
    backbone = get_backbone(bundle.model)
    if positions == "mrope" and backbone.position_rows == 1:
        with pytest.raises(ValueError, match="mrope"):
            IVTLR(bundle.model, bundle.latent_token_id, positions="mrope")
        batch = make_batch(bundle, [SampleSpec(QUESTION, 0)])
        vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
        with pytest.raises(ValueError, match="positions='mrope' is not supported.*'original'"):
            backbone.prompt_positions(batch["input_ids"], batch["attention_mask"], vision, "mrope")
        return
    engine = IVTLR(bundle.model, bundle.latent_token_id, positions=positions)
    one = SampleSpec(QUESTION, 0)
    for specs in ([one], [one, SampleSpec("Count?", 0, image_size=(84, 56), seed=4)]):
        batch = make_batch(bundle, specs)
        batch_size, length = batch["input_ids"].shape
        real = batch["attention_mask"].bool()
        assert bool(real.all()) == (batch_size == 1)  # the second prompt is shorter: padded
        with torch.no_grad(), recorded_positions(backbone.decoder()) as seen:
            out = engine(**batch)
            plain = bundle.model(**batch, **transformers_inputs(bundle, backbone, batch, positions))
        assert (out.logits[real] - plain.logits[real]).abs().max() < 1e-5
        assert abs(out.loss.item() - plain.loss.item()) < 1e-5
        assert len(seen) == 2 and seen[0].numel() == backbone.position_rows * batch_size * length
        ours, theirs = (p.reshape(-1, *p.shape[-2:]).expand(backbone.position_rows, batch_size, length)
                        for p in seen)
        assert torch.equal(ours[:, real], theirs[:, real])
        if positions == "mrope":  # the image's rows share positions: truly multimodal
            assert all(int(ours[:, b, real[b]].amax()) < int(real[b].sum()) - 1 for b in range(batch_size))
