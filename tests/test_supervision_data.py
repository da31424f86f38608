"""What step and region supervision read from the data (a ``step_boxes`` column, which step each latent slot
replaced, the collated targets and boxes), the settings that turn them on, and a training run that logs and resumes
them."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from ivtlr.config import Config, ConfigError
from ivtlr.data import Example, load_examples
from ivtlr.data.collate import IVTLRCollator
from ivtlr.data.curriculum import Curriculum, split_rationale
from ivtlr.testing import build_tiny
from schema_files import m3cot_rows, write_rows
from train_runs import column, final_weights, train_in_process, write_config

STEPS = ["red 7 is read first", "then the green cell", "5 ends the path"]
BOXES = ((0.0, 0.0, 28.0, 28.0), None, (28.0, 28.0, 56.0, 56.0))


def _example(**keys) -> Example:
    fields = dict(id="q", image=Image.new("RGB", (56, 56)), question="Which?", choices=["a", "b"], answer="A",
                  rationale=". ".join(STEPS), step_boxes=BOXES)
    return Example(**{**fields, **keys})


def test_each_latent_slot_knows_the_step_it_replaced_and_its_box():
    example = _example()
    assert split_rationale(example.rationale) == STEPS
    item = Curriculum(max_latent_stage=3).item(example, 2)
    assert item.n_latent == 2 and item.latent_steps == tuple(STEPS[:2]) and item.latent_boxes == BOXES[:2]
    assert item.target.startswith(STEPS[2])
    doubled = Curriculum(max_latent_stage=3, latents_per_step=2).item(example, 1)
    assert doubled.latent_steps == (STEPS[0], STEPS[0]) and doubled.latent_boxes == (BOXES[0], BOXES[0])
    one_step = _example(rationale="one step", step_boxes=(BOXES[0],))
    padded = Curriculum(max_latent_stage=3, pad_latent_to_max=True).item(one_step, 4)
    assert padded.latent_steps == ("one step", None, None) and padded.latent_boxes == (BOXES[0], None, None)
    assert Curriculum(max_latent_stage=3).item(_example(step_boxes=None), 3).latent_boxes == (None, None, None)
    assert Curriculum(mode="cot").item(example, 3).latent_steps == ()


def _rows_with_boxes(n: int) -> list[dict]:
    rows = m3cot_rows("train", n)
    for row in rows:
        n_steps = len(split_rationale(row["rationale"]))
        row["step_boxes"] = [[0, 0, 28, 28] if t % 2 == 0 else None for t in range(n_steps)]
    return rows


def test_step_boxes_load_with_the_m3cot_schema_and_bad_ones_skip_their_row(tmp_path):
    rows = _rows_with_boxes(4)
    rows[1]["step_boxes"] = rows[1]["step_boxes"] + [[0, 0, 1, 1]]  # one box too many
    rows[2]["step_boxes"] = [[5, 5, 2, 9]] * len(rows[2]["step_boxes"])  # x1 < x0
    del rows[3]["step_boxes"]  # no regions for this row: fine
    path = write_rows(tmp_path, "train", rows, "m3cot", fmt="jsonl")
    examples = list(load_examples("m3cot", "train", data_files={"train": str(path)}))
    assert [e.id for e in examples] == [rows[0]["id"], rows[3]["id"]]
    assert examples[0].step_boxes == tuple((0.0, 0.0, 28.0, 28.0) if t % 2 == 0 else None
                                           for t in range(len(rows[0]["step_boxes"])))
    assert examples[1].step_boxes is None
    with pytest.raises(ValueError, match="step_boxes does not match the steps"):
        load_examples("m3cot", "train", data_files={"train": str(path)}, strict=True)


def test_the_collator_writes_each_slots_step_tokens_and_box_fractions():
    tiny = build_tiny("qwen2_vl")
    collator = IVTLRCollator(tiny.processor, tiny.latent_token_id, image_size=56, step_targets=True,
                             step_regions=True)
    items = [Curriculum(max_latent_stage=3).item(_example(), 2),
             Curriculum(max_latent_stage=3).item(_example(id="r", image=Image.new("RGB", (112, 56))), 1)]
    batch = collator(items)
    tokenize = tiny.processor.tokenizer
    targets, regions = batch["step_targets"], batch["step_regions"]
    assert targets.shape[:2] == (2, 2) and regions.shape == (2, 2, 4)
    for b, item in enumerate(items):
        for slot in range(2):
            row = targets[b, slot][targets[b, slot] != -100].tolist()
            step = item.latent_steps[slot] if slot < item.n_latent else None
            assert row == (tokenize(f"{step}\n", add_special_tokens=False)["input_ids"] if step else [])
    assert regions[0, 0].tolist() == [0.0, 0.0, 0.5, 0.5] and bool(torch.isnan(regions[0, 1]).all())
    assert regions[1, 0].tolist() == [0.0, 0.0, 0.25, 0.5]  # pixels of a 112x56 picture
    assert bool(torch.isnan(regions[1, 1]).all())  # the second sample has one latent slot
    plain = IVTLRCollator(tiny.processor, tiny.latent_token_id, image_size=56)(items)
    assert "step_targets" not in plain and "step_regions" not in plain
    assert torch.equal(plain["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(("keys", "message"), [
    ({"step_supervision": -1.0}, "step_supervision must be >= 0"),
    ({"region_supervision": math.inf}, "region_supervision must be a finite number"),
    ({"step_supervision": 1.0, "mode": "latent_vision_only"}, "does not feed back"),
    ({"region_supervision": 1.0, "mode": "latent_text_only"}, "inserts none"),
    ({"region_supervision": 1.0, "num_selected_patches": 0}, "inserts none"),
    ({"step_supervision": 1.0, "mode": "cot"}, "which mode 'cot' has none of"),
])
def test_supervision_settings_that_cannot_apply_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        Config(**keys).check_values()
    Config(step_supervision=1.0, region_supervision=0.5).check_values()


def test_a_supervised_run_logs_both_losses_and_resumes_to_the_same_weights(tmp_path):
    files = {"train": write_rows(tmp_path / "data", "train", _rows_with_boxes(6), "m3cot", fmt="jsonl")}
    keys = dict(num_epochs=3, step_supervision=1.0, region_supervision=0.5, max_latent_stage=2)
    whole = train_in_process(write_config(tmp_path, files, name="whole", **keys))
    steps, regions = column(whole, "step_loss"), column(whole, "region_loss")
    stages = column(whole, "stage")
    assert all(s is None for s, stage in zip(steps, stages) if stage == 0)
    assert all(s is not None and s > 0 for s, stage in zip(steps, stages) if stage > 0)
    assert any(r is not None and r > 0 for r in regions)
    parts = write_config(tmp_path, files, name="parts", **{**keys, "num_epochs": 2})
    train_in_process(parts)
    resumed = train_in_process(parts, "num_epochs=3")
    resumed_steps = column(resumed, "step_loss")
    assert [s is None for s in resumed_steps] == [s is None for s in steps]
    assert [s for s in resumed_steps if s is not None] == pytest.approx([s for s in steps if s is not None], rel=1e-5)
    got, want = final_weights(resumed), final_weights(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
