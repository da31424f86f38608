"""``ivtlr bench serve --quick``: the server under concurrent clients beside offline evaluation, and the fault run."""
from __future__ import annotations

from ivtlr.bench import serve


def test_quick_run_measures_every_variant_and_the_faults(run_quick_benchmark):
    written = run_quick_benchmark(serve)
    rows = {row["variant"]: row for row in written["results"]["rows"]}
    assert set(rows) == {"offline_eval", "one_at_a_time", "serve_c1", "serve_c4"}
    assert all(row["questions_per_s"] > 0 for row in rows.values())
    assert rows["serve_c4"]["failed"] == 0 and rows["serve_c4"]["unequal"] == 0 and rows["serve_c1"]["unequal"] == 0
    assert rows["serve_c4"]["occupancy"] > 1  # clients in flight together shared engine passes
    faults = written["results"]["faults"]
    assert faults["burst_429"] > 0 and set(faults["burst_statuses"]) == {200, 429}
    assert faults["bad_requests_4xx"] and faults["good_interleaved_right"] and faults["good_after"]
    assert faults["queue_depth_after"] == 0 and faults["active_after"] == 0
