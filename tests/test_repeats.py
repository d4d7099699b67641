"""Repeats over seeds: grouping by stage name, spread, paired differences, the report section."""

from __future__ import annotations

import pytest

from snncompress.repeats import paired_difference, pool_runs, repeat_lines, repeats_by_method, spread


def test_paired_difference_by_hand():
    # differences 1.0, -0.5, 1.0: mean 0.5, sd sqrt(1.5 / 2) = 0.866; t(0.975, 2) = 4.303; sd / sqrt(3) = 0.5
    d = paired_difference({1: 91.0, 2: 90.0, 3: 92.0, 7: 80.0}, {1: 90.0, 2: 90.5, 3: 91.0, 9: 99.0})
    assert d.n == 3 and d.mean == pytest.approx(0.5) and d.sd == pytest.approx(0.8660254)
    assert (d.low, d.high) == (pytest.approx(0.5 - 2.1515), pytest.approx(0.5 + 2.1515))
    assert (d.wins, d.ties, d.losses) == (2, 0, 1)


def test_one_common_seed_is_no_difference():
    assert paired_difference({1: 90.0, 2: 91.0}, {2: 90.0, 3: 91.0}) is None


def test_spread_by_hand():
    s = spread([90.0, 91.0, 92.0, 91.0])  # deviations -1, 0, 1, 0: variance 2 / 3
    assert (s.n, s.mean, s.sd) == (4, 91.0, pytest.approx((2 / 3) ** 0.5))
    assert spread([90.5]).sd == 0.0


STAGES = [
    {"name": "train_snn", "metrics": {"accuracy": 0.9057, "val_accuracy": 0.911}},
    {"name": "crit-s1", "metrics": {"accuracy": 0.910, "val_accuracy": 0.9130}},
    {"name": "magnitude-s1", "metrics": {"accuracy": 0.900, "val_accuracy": 0.9100}},
    {"name": "crit-s2", "metrics": {"accuracy": 0.900, "val_accuracy": 0.9100}},
    {"name": "magnitude-s2", "metrics": {"accuracy": 0.905, "val_accuracy": 0.9100}},
    {"name": "crit-s3", "metrics": {"accuracy": 0.920}},
    {"name": "magnitude-s3", "metrics": {"accuracy": 0.910}},
    {"name": "imp-s1", "metrics": {"accuracy": 0.95, "val_accuracy": 0.95}},
]


def test_stages_group_by_method_and_seed():
    test = repeats_by_method(STAGES, "accuracy")
    assert set(test) == {"crit", "magnitude"}  # train_snn is no repeat; imp has one seed
    assert test["crit"] == {1: pytest.approx(91.0), 2: pytest.approx(90.0), 3: pytest.approx(92.0)}
    assert set(repeats_by_method(STAGES, "val_accuracy")["crit"]) == {1, 2}  # seed 3 has no val_accuracy


def test_the_report_section_holds_the_spread_and_the_paired_rows():
    lines = repeat_lines(STAGES)
    assert lines[0] == "## Repeats over seeds"
    assert "| crit | 1, 2, 3 | 91.15 ± 0.21 | 91.00 ± 1.00 |" in lines
    assert "| magnitude | 1, 2, 3 | 91.00 ± 0.00 | 90.50 ± 0.50 |" in lines
    # test: the pairs of test_paired_difference_by_hand; val: +0.30 and 0.00, t(0.975, 1) = 12.706 times 0.15
    assert "| crit − magnitude | test | 3 | +0.50 | 0.87 | [-1.65, +2.65] | 2 / 0 / 1 |" in lines
    assert "| crit − magnitude | val | 2 | +0.15 | 0.21 | [-1.76, +2.06] | 1 / 1 / 0 |" in lines
    assert repeat_lines(STAGES[:3]) == []


def test_seeds_split_over_runs_pool_into_one_group():
    first, second = ("a", STAGES[:3]), ("b", STAGES[3:])  # seeds 1 | 2, 3 and imp-s1
    pooled = pool_runs([first, second])
    assert [s["name"] for s in pooled] == [s["name"] for s in STAGES]
    assert "| crit − magnitude | test | 3 | +0.50 | 0.87 | [-1.65, +2.65] | 2 / 0 / 1 |" in repeat_lines(pooled)


def test_a_seed_held_by_two_runs_keeps_the_runs_apart():
    at98 = [{"name": "crit-s1", "metrics": {"accuracy": 0.80}}, {"name": "crit-s2", "metrics": {"accuracy": 0.82}},
            {"name": "magnitude-s5", "metrics": {"accuracy": 0.70}}]
    pooled = pool_runs([("s90", STAGES), ("s98", at98)])
    names = [s["name"] for s in pooled]
    assert names[1:4] == ["s90/crit-s1", "magnitude-s1", "s90/crit-s2"]  # magnitude shares no seed: pooled
    assert names[-3:] == ["s98/crit-s1", "s98/crit-s2", "magnitude-s5"]
    by_method = repeats_by_method(pooled, "accuracy")
    assert by_method["magnitude"] == {1: pytest.approx(90.0), 2: pytest.approx(90.5), 3: pytest.approx(91.0),
                                      5: pytest.approx(70.0)}
    # s90 - s98 over seeds 1, 2: 91 - 80 = 11 and 90 - 82 = 8
    assert "| s90/crit − s98/crit | test | 2 | +9.50 | 2.12 | [-9.56, +28.56] | 2 / 0 / 0 |" in repeat_lines(pooled)
