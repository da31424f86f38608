import json
import logging
from dataclasses import replace

import pytest

from ivtlr.evaluation.answers import extract_answer, is_correct, loose_candidates, option_letters
from ivtlr.evaluation.records import (PredictionRecord, accuracy_by_rule, append_jsonl, format_summary_table,
                                      load_done_ids, read_jsonl, read_predictions, scienceqa_context_type, summarize)

FOUR = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Therefore, the answer is B", "B"),
        ("Therefore, the answer is (c)", "C"),
        ("the answer is b.", "B"),
        ("THE ANSWER IS D)", "D"),
        ("Answer: A", "A"),
        ("Answer:\n\n  (D).{fish}", "D"),
        ("The final answer is: B!", "B"),
        ("Step one.\nStep two mentions A and C.\nTherefore, the answer is C\n", "C"),
        # last occurrence wins
        ("the answer is A. Wait, re-checking: the answer is D.", "D"),
        # "Answer: The ..." starts a word, not an option; the later phrase decides
        ("Answer: The animal has feathers, so the answer is C", "C"),
        # the article "a" is not option A, an outside letter does not count, the valid one before it does
        ("the answer is a cat", None),
        ("the answer is E", None),
        ("the answer is B. Hmm, the answer is Z.", "B"),
        # no phrase: the original rule does not guess from option text or bare letters
        ("It is a dog (B)", None),
        ("", None),
        ("I cannot tell from the image.", None),
    ],
)
def test_original_rule(text, expected):
    assert extract_answer(text, FOUR) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the last parenthesised letter, whatever the phrase
        ("(A) is wrong, (c) is right", "C"),
        ("Therefore, the answer is (b).", "B"),
        ("maybe (A)... but (Z)", None),  # official predicts Z: a wrong answer either way
        # option text: the option LISTED last among those mentioned, not the one mentioned last
        ("It is a Fish, not a cat", "D"),
        ("It is a cat, not a fish", "D"),
        ("It is a DOG", "B"),
        # bare letters: capitals, split on spaces after removing newlines and .,!?
        ("I pick C.", "C"),
        ("B\nor A", "B"),
        ("maybe b", "B"),
        ("Answer: B)", None),  # ")" stays glued to the word in the official split
        ("nothing useful here", None),
        # "[Answer]" sections: only the answer part is read
        ("[Rationale] (A) looks plausible [Answer] It is C", "C"),
    ],
)
def test_m3cot_rule(text, expected):
    assert extract_answer(text, FOUR, rule="m3cot") == expected


def test_m3cot_rule_prefers_capital_letters_over_lower_case():
    # "a" (article) would give A in the lower-case pass, but a capital D is found first.
    assert extract_answer("a guess: D", ["x", "y", "z", "w"], rule="m3cot") == "D"
    assert extract_answer("a guess", ["x", "y", "z", "w"], rule="m3cot") == "A"


def test_only_letters_within_the_options_count():
    assert extract_answer("the answer is C", ["yes", "no"]) is None
    assert extract_answer("I pick C", ["yes", "no"], rule="m3cot") is None


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="unknown answer-extraction rule"):
        extract_answer("the answer is A", FOUR, rule="lenient")


def test_option_letters():
    assert option_letters(3) == ["A", "B", "C"]
    with pytest.raises(ValueError):
        option_letters(27)


def _record(id, answer, generated, domain="science", topic="physics", tokens=10, seconds=0.5, **groups):
    return PredictionRecord.from_generation(
        id=id,
        choices=FOUR,
        answer=answer,
        question=f"question {id}",
        generated_text=generated,
        n_generated_tokens=tokens,
        seconds=seconds,
        domain=domain,
        topic=topic,
        groups=groups,
    )


def test_record_from_generation_scores_the_prediction():
    right = _record(1, "B", "Therefore, the answer is B")
    wrong = _record(2, "B", "Therefore, the answer is C")
    silent = _record(3, "B", "no idea")
    assert (right.id, right.prediction, right.correct) == ("1", "B", True)
    assert (wrong.prediction, wrong.correct) == ("C", False)
    assert (silent.prediction, silent.correct) == (None, False)
    assert right.messages == ["question 1", "Therefore, the answer is B"]


def test_record_dict_is_flat_with_the_official_fields_and_round_trips():
    record = _record("test-7", "A", "the answer is A", subject="physics", grade="grade3")
    flat = record.to_dict()
    assert {"id", "choices", "answer", "domain", "topic", "messages"} <= flat.keys()
    assert flat["subject"] == "physics" and "groups" not in flat
    assert PredictionRecord.from_dict(flat) == record


def test_group_keys_may_not_shadow_fields():
    with pytest.raises(ValueError, match="clash"):
        replace(_record(1, "A", "x"), groups={"topic": "x"}).to_dict()


def test_scienceqa_context_type():
    assert scienceqa_context_type({"image": object(), "hint": "some hint"}) == "image"
    assert scienceqa_context_type({"image": None, "hint": "some hint"}) == "text"
    assert scienceqa_context_type({"image": None, "hint": "  "}) == "none"
    assert scienceqa_context_type({"image": {"bytes": None, "path": None}, "hint": ""}) == "none"
    assert scienceqa_context_type({"image": {"bytes": b"\x89PNG", "path": None}, "hint": ""}) == "image"


def _hand_built_records():
    return [
        _record(1, "A", "the answer is A", domain="science", topic="physics", tokens=10, seconds=0.5),
        _record(2, "B", "the answer is C", domain="science", topic="physics", tokens=12, seconds=0.7),
        _record(3, "C", "the answer is C", domain="science", topic="biology", tokens=8, seconds=0.3),
        _record(4, "D", "no answer", domain="math", topic="algebra", tokens=20, seconds=1.5),
        _record(5, "A", "the answer is A", domain="math", topic="algebra", tokens=10, seconds=1.0),
    ]


def test_summarize_exact_numbers():
    summary = summarize(_hand_built_records(), ["domain", "topic"])
    overall = summary["overall"]
    assert overall["count"] == 5
    assert overall["correct"] == 3
    assert overall["unanswered"] == 1
    assert overall["accuracy"] == pytest.approx(0.6)
    assert overall["avg_generated_tokens"] == pytest.approx(12.0)
    assert overall["seconds_per_question"] == pytest.approx(0.8)
    assert overall["questions_per_second"] == pytest.approx(1.25)
    assert list(summary["groups"]["domain"]) == ["math", "science"]
    assert summary["groups"]["domain"]["science"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["groups"]["domain"]["math"]["avg_generated_tokens"] == pytest.approx(15.0)
    assert {topic: stats["correct"] for topic, stats in summary["groups"]["topic"].items()} == {
        "algebra": 1,
        "biology": 1,
        "physics": 1,
    }


def test_group_accuracies_weighted_by_counts_add_up_to_overall():
    summary = summarize(_hand_built_records(), ["domain", "topic"])
    for by_value in summary["groups"].values():
        assert sum(stats["count"] for stats in by_value.values()) == summary["overall"]["count"]
        weighted = sum(stats["accuracy"] * stats["count"] for stats in by_value.values())
        assert weighted / summary["overall"]["count"] == pytest.approx(summary["overall"]["accuracy"])


def test_summarize_groups_by_metadata_in_natural_order():
    records = [
        _record(1, "A", "the answer is A", grade="grade10"),
        _record(2, "A", "the answer is B", grade="grade2"),
        _record(3, "A", "the answer is A", grade="grade2"),
    ]
    grades = summarize(records, ["grade"])["groups"]["grade"]
    assert list(grades) == ["grade2", "grade10"]
    assert grades["grade2"]["accuracy"] == pytest.approx(0.5)


def test_summarize_empty():
    assert summarize([], ["domain"]) == {
        "overall": {
            "count": 0,
            "correct": 0,
            "unanswered": 0,
            "accuracy": 0.0,
            "avg_generated_tokens": 0.0,
            "seconds_per_question": 0.0,
            "questions_per_second": 0.0,
        },
        "groups": {"domain": {}},
    }


def test_format_summary_table():
    table = format_summary_table(summarize(_hand_built_records(), ["domain"]))
    lines = table.splitlines()
    assert len(lines) == 2 + 1 + 2  # header, rule, overall, two domains
    assert lines[2] == "| overall | all | 5 | 60.00 | 1 | 12.0 | 0.800 | 1.25 |"
    assert lines[3] == "| domain | math | 2 | 50.00 | 1 | 15.0 | 1.250 | 0.80 |"


def test_jsonl_round_trip_and_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "out" / "predictions.jsonl"
    records = _hand_built_records()
    append_jsonl(path, records[:2])
    append_jsonl(path, records[2:4])
    with path.open("a", encoding="utf-8") as out:  # a crash in the middle of writing record 5
        out.write(json.dumps(records[4].to_dict())[:25])

    with caplog.at_level(logging.WARNING, logger="ivtlr.evaluation.records"):
        assert read_predictions(path) == records[:4]
    assert "truncated" in caplog.text
    assert load_done_ids(path) == {"1", "2", "3", "4"}

    append_jsonl(path, records[4:])  # resuming cuts the broken fragment off first
    assert read_predictions(path) == records
    assert path.read_text(encoding="utf-8").count("\n") == 5


def test_append_keeps_a_whole_last_record_missing_its_newline(tmp_path):
    path = tmp_path / "predictions.jsonl"
    first, second = _hand_built_records()[:2]
    path.write_text(json.dumps(first.to_dict()), encoding="utf-8")
    assert load_done_ids(path) == {"1"}
    append_jsonl(path, [second])
    assert read_predictions(path) == [first, second]


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "1"}\n{"id": \n{"id": "3"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_resume_skips_done_ids(tmp_path):
    path = tmp_path / "predictions.jsonl"
    assert load_done_ids(path) == set()
    all_records = _hand_built_records()
    append_jsonl(path, all_records[:3])

    done = load_done_ids(path)
    remaining = [record for record in all_records if record.id not in done]
    append_jsonl(path, remaining)

    ids = [flat["id"] for flat in read_jsonl(path)]
    assert ids == ["1", "2", "3", "4", "5"]


PROMPT = "[Question]:Which animal is shown?\n[Options]:\n(A).cat\n(B).dog\n(C).bird\n(D).fish\nAnswer:\n"


@pytest.mark.parametrize(
    ("decoded", "candidates"),
    [
        # The research scripts decode prompt and output together: the output's first letter follows "Answer:".
        (PROMPT + "Therefore, the answer is B", ["T", "B"]),
        (PROMPT + "7 in the red cell. Therefore, the answer is B", ["B"]),  # a digit after "Answer:" names nothing
        # The chat template's role word after the prompt's "Answer:" is dropped before reading.
        ("Options: A. cat\nAnswer:\nassistant\nC is right. the answer is D", ["C", "D"]),
        # Several "answer is" phrases: every one counts.
        ("the answer is A. No wait, the answer is C.", ["A", "C"]),
        # Any case, read as a capital; extra whitespace and newlines after the phrase.
        ("THE ANSWER IS d", ["D"]),
        ("the   answer\nis \n b", ["B"]),
        ("answer: c", ["C"]),
        # A bracketed letter is not read (a letter must follow the phrase directly), nor a phrase without a letter.
        ("The answer is (B).", []),
        ("The answer is 42", []),
    ],
)
def test_ivtlr_loose_reads_every_letter_after_an_answer_phrase(decoded, candidates):
    assert loose_candidates(decoded) == candidates


def test_ivtlr_loose_counts_the_gold_letter_if_any_candidate_names_it():
    # An output starting with a letter word is "right" when that letter is the gold one: the rule's known leniency.
    assert is_correct(PROMPT, "Because the dog barks, the answer is A", FOUR, "B", "ivtlr_loose")
    assert is_correct(PROMPT, "Because the dog barks, the answer is A", FOUR, "A", "ivtlr_loose")
    assert not is_correct(PROMPT, "Because the dog barks, the answer is A", FOUR, "C", "ivtlr_loose")
    assert not is_correct(PROMPT, "Because the dog barks, the answer is A", FOUR, "B", "original")
    record = PredictionRecord.from_generation(id=1, choices=FOUR, answer="B", question=PROMPT,
                                              generated_text="Because ... the answer is A", n_generated_tokens=5,
                                              seconds=0.1, rule="ivtlr_loose")
    assert record.correct and record.prediction == "B"


def test_accuracy_by_rule_rescores_every_record_with_the_configured_rule_first():
    records = [
        PredictionRecord.from_generation(id=i, choices=FOUR, answer=gold, question=PROMPT, generated_text=text,
                                         n_generated_tokens=5, seconds=0.1)
        for i, (gold, text) in enumerate([
            ("B", "Therefore, the answer is B"),  # right under every rule
            ("D", "dog, so the answer is (B)"),  # original: B; m3cot: (B); loose: the output's first letter "d"
            ("A", "I would say dog"),  # original: none; m3cot: the option text "dog" -> B; loose: "I"
        ])
    ]
    assert accuracy_by_rule(records, "m3cot") == {"m3cot": pytest.approx(1 / 3), "original": pytest.approx(1 / 3),
                                                   "ivtlr_loose": pytest.approx(2 / 3)}
    assert list(accuracy_by_rule(records)) == ["original", "m3cot", "ivtlr_loose"]
