"""Optimize's choice among candidate engines on validation, without Prefect."""

from __future__ import annotations

from tasks.optimize import Candidate, _choose_on_noninferiority


def candidates(*verdicts: bool | None) -> list[Candidate]:
    out = []
    for i, passes in enumerate(verdicts):
        c = Candidate(f"c{i}", f"c{i}.onnx", "int8", passes=True, why="passes")
        if passes is not None:
            c.noninferiority = {"passes": passes, "statement": f"statement {i}"}
        out.append(c)
    return out


def test_non_inferiority_on_val_refuses_the_candidates_it_did_not_show_when_another_was_shown():
    cs = candidates(True, False, True)
    _choose_on_noninferiority(cs)
    assert [c.passes for c in cs] == [True, False, True]
    assert cs[1].why == "val, against the baseline: statement 1"


def test_when_no_candidate_is_shown_non_inferior_val_does_not_choose_and_says_so():
    cs = candidates(False, False)
    _choose_on_noninferiority(cs)
    assert all(c.passes for c in cs)  # the test split decides promotion; the fastest graph stays eligible
    assert all("no candidate was shown non-inferior" in c.why and f"statement {i}" in c.why for i, c in enumerate(cs))


def test_without_a_baseline_nothing_changes():
    cs = candidates(None, None)
    _choose_on_noninferiority(cs)
    assert [(c.passes, c.why) for c in cs] == [(True, "passes"), (True, "passes")]
