"""Visual CoT's metadata records (question, free-text answer, image, region boxes) read as examples whose one
reasoning step is the region, written as text and named as the step's box — checked on a small file in that schema
with real pictures, against values worked out by hand from the records."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from ivtlr.data import detect_schema, load_examples, split_rationale
from ivtlr.data.collate import IVTLRCollator
from ivtlr.data.curriculum import Curriculum
from ivtlr.testing import build_tiny
from train_runs import column, train_in_process, write_config


def _record(question, answer, image, size, boxes, dataset="vsr", **extra):
    return {"question": question, "answer": answer, "image": image, "width": size[0], "height": size[1],
            "bboxs": boxes, "dataset": dataset, "split": "train", **extra}


RECORDS = [
    _record("Is the car over the cat?", "No", "a.png", (64, 48), [[8.0, 12.0, 40.0, 36.0]]),
    _record("What is under the teddy bear?", "couch", "b.png", (64, 48),
            [[0.0, 0.0, 16.0, 16.0], [32.0, 8.0, 48.0, 40.0]]),
    _record("What is next to the person?", "elephant", "a.png", (64, 48), [[-2.0, 4.0, 64.0, 48.0]]),
    _record("What does the suitcase contain?", "teddy bear", "b.png", (64, 48), [[16.0, 16.0, 32.0, 32.0]]),
    _record("Which word is written?", "stop", "c.png", (128, 96), [[64.0, 48.0, 128.0, 96.0]], dataset="textvqa"),
    _record("What colour is it?", "red", "a.png", (64, 48), [[0.0, 0.0, 8.0, 8.0]], dataset="gqa",
            choices=["blue", "red", "green"]),
    _record("Which brand is shown?", "acme", "c.png", (128, 96), [[0.0, 0.0, 64.0, 48.0]], dataset="textvqa"),
    _record("No region here?", "Yes", "a.png", (64, 48), []),  # no box: skipped
    _record("Broken box?", "Yes", "a.png", (64, 48), [[10.0, 10.0, 5.0, 20.0]]),  # x1 < x0: skipped
    _record("Only answer in its subset?", "lonely", "a.png", (64, 48), [[0.0, 0.0, 8.0, 8.0]], dataset="solo"),
]


@pytest.fixture
def metadata_file(tmp_path):
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(tmp_path / "b.png")
    Image.new("RGB", (64, 48), (10, 10, 200)).save(tmp_path / "c.png")  # stored at half the size the record states
    path = tmp_path / "vsr_cot_train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return path


def test_the_schema_is_recognised_by_its_columns():
    assert detect_schema(list(RECORDS[0])) == "viscot"
    assert detect_schema(["question", "choices", "answer", "rationale"]) == "m3cot"


def test_records_become_examples_whose_step_is_the_merged_region(metadata_file, caplog):
    examples = list(load_examples("auto", "train", data_files=str(metadata_file)))
    assert [e.question for e in examples] == [r["question"] for r in RECORDS[:7]]
    assert "skipped 3 invalid rows" in caplog.text  # no box, a box without area, no distractor in its subset
    boxes = [e.step_boxes for e in examples]
    assert boxes[0] == ((8.0, 12.0, 40.0, 36.0),)
    assert boxes[1] == ((0.0, 0.0, 48.0, 40.0),)  # the box that holds both
    assert boxes[2] == ((0.0, 4.0, 64.0, 48.0),)  # negative corner clipped
    assert boxes[4] == ((32.0, 24.0, 64.0, 48.0),)  # stated for 128x96, the stored picture is 64x48
    assert examples[0].rationale == "[0.125, 0.250, 0.625, 0.750]"
    assert examples[1].rationale == "[0.000, 0.000, 0.750, 0.833]"
    assert examples[4].rationale == "[0.500, 0.500, 1.000, 1.000]"
    for example in examples:
        assert split_rationale(example.rationale) == [example.rationale]  # one step, one box
        assert len(example.step_boxes) == 1
        assert example.image is not None and example.image.size == (64, 48)


def test_options_are_posed_from_the_split_and_the_same_every_load(metadata_file):
    first = list(load_examples("viscot", "train", data_files=str(metadata_file)))
    again = list(load_examples("viscot", "train", data_files=str(metadata_file)))
    assert [(e.choices, e.answer) for e in first] == [(e.choices, e.answer) for e in again]
    by_question = {e.question: e for e in first}
    yes_no = by_question["Is the car over the cat?"]
    assert yes_no.choices == ["Yes", "No"] and yes_no.answer == "B"
    for record in RECORDS[1:4]:  # free answers of subset vsr: the other vsr answers are the distractors
        example = by_question[record["question"]]
        assert example.answer_text == record["answer"]
        assert sorted(example.choices) == sorted({"couch", "elephant", "teddy bear"})
    textvqa = by_question["Which word is written?"]  # distractors come from its own subset only
    assert sorted(textvqa.choices) == ["acme", "stop"] and textvqa.answer_text == "stop"
    given = by_question["What colour is it?"]
    assert given.choices == ["blue", "red", "green"] and given.answer == "B"


def test_the_collated_step_is_the_region_text_and_its_box_fractions(metadata_file):
    tiny = build_tiny("qwen2_vl")
    example = load_examples("viscot", "train", data_files=str(metadata_file))[1]
    item = Curriculum(max_latent_stage=1).item(example, 1)
    assert item.latent_steps == (example.rationale,) and item.latent_boxes == example.step_boxes
    collator = IVTLRCollator(tiny.processor, tiny.latent_token_id, image_size=56, step_targets=True,
                             step_regions=True)
    batch = collator([item])
    assert batch["step_regions"][0, 0].tolist() == pytest.approx([0.0, 0.0, 48 / 64, 40 / 48])
    targets = batch["step_targets"][0, 0]
    decoded = tiny.processor.tokenizer.decode(targets[targets != -100].tolist())
    assert decoded.strip().startswith(example.rationale)


def test_a_run_on_visual_cot_records_trains_with_step_and_region_supervision(metadata_file, tmp_path):
    config = write_config(tmp_path, {"train": metadata_file}, schema="viscot", num_epochs=2, max_latent_stage=1,
                          step_supervision=1.0, region_supervision=0.5)
    run = train_in_process(config)
    stages, steps, regions = column(run, "stage"), column(run, "step_loss"), column(run, "region_loss")
    assert 1 in stages
    assert all(s is not None and s > 0 and r is not None and r > 0
               for s, r, stage in zip(steps, regions, stages) if stage == 1)
