"""Unmixed / mixed task samplers: frequencies, determinism across ranks and resumes, weight rules."""

import math
from collections import Counter

import pytest
from scipy.stats import chisquare

from uniperceiver_v2.engine.sampling import (
    MixedTaskSampler,
    UnmixedTaskSampler,
    normalize_weights,
    sqrt_size_weights,
)

TASKS = ["classification", "detection", "mlm", "captioning", "retrieval"]
WEIGHTS = {"classification": 0.1, "detection": 0.25, "mlm": 0.05, "captioning": 0.3, "retrieval": 0.3}


def test_unmixed_frequencies_match_sampling_ratios():
    sampler = UnmixedTaskSampler(TASKS, WEIGHTS, seed=7)
    draws = 20_000
    counts = Counter(sampler.task_for_iteration(i) for i in range(draws))
    observed = [counts[t] for t in TASKS]
    expected = [draws * WEIGHTS[t] / sum(WEIGHTS.values()) for t in TASKS]
    assert chisquare(observed, expected).pvalue > 1e-3
    for t in TASKS:
        s_k = sampler.sampling_ratio(t)
        assert abs(counts[t] / draws - s_k) < 5 * math.sqrt(s_k * (1 - s_k) / draws)


def test_same_seed_gives_same_tasks_on_every_rank():
    # Two instances stand for two ranks: they must agree without communicating.
    rank0 = UnmixedTaskSampler(TASKS, WEIGHTS, seed=123)
    rank1 = UnmixedTaskSampler(TASKS, dict(reversed(list(WEIGHTS.items()))), seed=123)
    assert [rank0.task_for_iteration(i) for i in range(500)] == [rank1.task_for_iteration(i) for i in range(500)]
    other_seed = UnmixedTaskSampler(TASKS, WEIGHTS, seed=124)
    assert [rank0.task_for_iteration(i) for i in range(500)] != [other_seed.task_for_iteration(i) for i in range(500)]


def test_resume_continues_the_same_sequence():
    running = UnmixedTaskSampler(TASKS, WEIGHTS, seed=5)
    full_run = [running.task_for_iteration(i) for i in range(300)]
    resumed = UnmixedTaskSampler(TASKS, WEIGHTS, seed=5)  # fresh process after loading a checkpoint at it=150
    assert [resumed.task_for_iteration(i) for i in range(150, 300)] == full_run[150:]


def test_weights_as_sequence_and_zero_weight_task_never_drawn():
    sampler = UnmixedTaskSampler(["a", "b", "c"], [1.0, 0.0, 3.0], seed=0)
    assert sampler.sampling_ratios == {"a": 0.25, "b": 0.0, "c": 0.75}
    assert "b" not in {sampler.task_for_iteration(i) for i in range(2000)}


def test_single_task_is_always_drawn():
    sampler = UnmixedTaskSampler(["only"], {"only": 2.0}, seed=0)
    assert {sampler.task_for_iteration(i) for i in range(50)} == {"only"}
    assert sampler.sampling_ratio("only") == 1.0


def test_sqrt_size_weights_against_hand_computation():
    # sqrt(100) = 10, sqrt(400) = 20, sqrt(2500) = 50: ratios 10/80, 20/80, 50/80.
    weights = sqrt_size_weights({"coco": 100, "vg": 400, "cc3m": 2500})
    assert weights == pytest.approx({"coco": 0.125, "vg": 0.25, "cc3m": 0.625})
    assert math.fsum(weights.values()) == pytest.approx(1.0)


def test_normalize_weights():
    assert normalize_weights({"a": 2.0, "b": 6.0}) == {"a": 0.25, "b": 0.75}


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": 1.0, "b": -0.5}, "'b'"),
        ({"a": 0.0, "b": 0.0}, "all sampling weights are zero"),
        ({"a": 1.0, "b": 1.0, "typo": 1.0}, "unknown task 'typo'"),
        ({"a": 1.0}, "no sampling weight given for task 'b'"),
        ({"a": 1.0, "b": math.nan}, "'b'"),
    ],
)
def test_bad_weights_raise_naming_the_task(weights, message):
    with pytest.raises(ValueError, match=message):
        UnmixedTaskSampler(["a", "b"], weights, seed=0)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="more than once"):
        UnmixedTaskSampler(["a", "a"], [1.0, 1.0], seed=0)
    with pytest.raises(ValueError, match="2 tasks but 3 weights"):
        UnmixedTaskSampler(["a", "b"], [1.0, 1.0, 1.0], seed=0)
    with pytest.raises(ValueError, match="unknown task 'z'"):
        UnmixedTaskSampler(["a", "b"], [1.0, 1.0], seed=0).sampling_ratio("z")
    with pytest.raises(ValueError, match="'big'"):
        sqrt_size_weights({"big": -3})
    with pytest.raises(ValueError, match="num_slots"):
        MixedTaskSampler(["a"], [1.0], seed=0, num_slots=0)


def test_mixed_sampler_fractions_and_frequencies():
    sampler = MixedTaskSampler(TASKS, WEIGHTS, seed=3, num_slots=8)
    slot_counts = Counter()
    share = Counter()
    iterations = 3000
    for i in range(iterations):
        slots = sampler.slots_for_iteration(i)
        assert len(slots) == 8
        tasks = sampler.tasks_for_iteration(i)
        assert math.fsum(f for _, f in tasks) == pytest.approx(1.0)
        assert [t for t, _ in tasks] == [t for t in TASKS if t in slots]  # task_names order, no duplicates
        assert dict(tasks) == {t: c / 8 for t, c in Counter(slots).items()}
        slot_counts.update(slots)
        for task, fraction in tasks:
            share[task] += fraction
    observed = [slot_counts[t] for t in TASKS]
    expected = [iterations * 8 * sampler.sampling_ratio(t) for t in TASKS]
    assert chisquare(observed, expected).pvalue > 1e-3
    # Each task's average share of an iteration's batch is its sampling ratio, as with unmixed sampling.
    for t in TASKS:
        assert share[t] / iterations == pytest.approx(sampler.sampling_ratio(t), abs=0.01)


def test_mixed_sampler_is_deterministic_in_seed_and_iteration():
    a = MixedTaskSampler(TASKS, WEIGHTS, seed=11, num_slots=4)
    b = MixedTaskSampler(TASKS, WEIGHTS, seed=11, num_slots=4)
    forward = [a.slots_for_iteration(i) for i in range(100)]
    backward = [b.slots_for_iteration(i) for i in reversed(range(100))]  # order of queries must not matter
    assert forward == backward[::-1]


# --- tasks that join late (tasks.<name>.start_iteration) ------------------------------------------------------------
def test_a_late_task_is_never_drawn_before_its_start_and_the_others_share_its_probability():
    sampler = UnmixedTaskSampler(TASKS, WEIGHTS, seed=3, start_iterations={"classification": 4000})
    before = Counter(sampler.task_for_iteration(i) for i in range(4000))
    assert before["classification"] == 0
    rest = sum(v for t, v in WEIGHTS.items() if t != "classification")
    others = [t for t in TASKS if t != "classification"]
    assert chisquare([before[t] for t in others], [4000 * WEIGHTS[t] / rest for t in others]).pvalue > 1e-3
    after = Counter(sampler.task_for_iteration(i) for i in range(4000, 24_000))
    assert chisquare([after[t] for t in TASKS],
                     [20_000 * WEIGHTS[t] / sum(WEIGHTS.values()) for t in TASKS]).pvalue > 1e-3
    # s_k is the long-run share throughout (what MT-AdamW's compensation reads)
    assert sampler.sampling_ratio("classification") == pytest.approx(0.1)
    assert sampler.active_ratios(0)["classification"] == 0.0
    assert sampler.active_ratios(0)["retrieval"] == pytest.approx(0.3 / 0.9)
    assert sampler.active_ratios(4000) == pytest.approx(sampler.sampling_ratios)


def test_start_zero_everywhere_draws_exactly_as_without_start_iterations():
    plain = UnmixedTaskSampler(TASKS, WEIGHTS, seed=9)
    zeros = UnmixedTaskSampler(TASKS, WEIGHTS, seed=9, start_iterations={t: 0 for t in TASKS})
    assert [plain.task_for_iteration(i) for i in range(500)] == [zeros.task_for_iteration(i) for i in range(500)]
    # after every start the draws are those of the plain sampler again: the draw is a function of (seed, iteration)
    late = UnmixedTaskSampler(TASKS, WEIGHTS, seed=9, start_iterations={"captioning": 100})
    assert [late.task_for_iteration(i) for i in range(100, 500)] == [plain.task_for_iteration(i)
                                                                      for i in range(100, 500)]


def test_expected_iterations_against_the_closed_form_and_counts():
    sampler = UnmixedTaskSampler(TASKS, WEIGHTS, seed=1, start_iterations={"classification": 1000, "mlm": 300})
    # classification: 0.1 from 1000 on; mlm: 0 before 300, then 0.05 / 0.9 until 1000, then 0.05
    assert sampler.expected_iterations("classification", 3000) == pytest.approx(0.1 * 2000)
    assert sampler.expected_iterations("mlm", 3000) == pytest.approx(700 * 0.05 / 0.9 + 2000 * 0.05)
    assert sampler.expected_iterations("retrieval", 3000) == pytest.approx(
        300 * 0.3 / 0.85 + 700 * 0.3 / 0.9 + 2000 * 0.3)
    assert sum(sampler.expected_iterations(t, 3000) for t in TASKS) == pytest.approx(3000)
    assert sampler.expected_iterations("classification", 500) == 0.0
    counts = Counter(sampler.task_for_iteration(i) for i in range(3000))
    for t in TASKS:
        e = sampler.expected_iterations(t, 3000)
        assert abs(counts[t] - e) < 5 * math.sqrt(e) + 1


def test_mixed_sampler_respects_start_iterations_and_resumes():
    sampler = MixedTaskSampler(TASKS, WEIGHTS, seed=2, num_slots=4, start_iterations={"retrieval": 50})
    assert all("retrieval" not in sampler.slots_for_iteration(i) for i in range(50))
    assert any("retrieval" in sampler.slots_for_iteration(i) for i in range(50, 100))
    again = MixedTaskSampler(TASKS, WEIGHTS, seed=2, num_slots=4, start_iterations={"retrieval": 50})
    assert [again.slots_for_iteration(i) for i in range(30, 80)] == [sampler.slots_for_iteration(i)
                                                                     for i in range(30, 80)]


@pytest.mark.parametrize("starts, message", [
    ({"unknown": 3}, "unknown task 'unknown'"),
    ({"mlm": -1}, "task 'mlm': start iteration must be a non-negative integer"),
    ({"mlm": 1.5}, "task 'mlm': start iteration must be a non-negative integer"),
    ({t: 10 for t in TASKS}, "no task with a positive sampling weight starts at iteration 0"),
])
def test_bad_start_iterations_raise(starts, message):
    with pytest.raises(ValueError, match=message):
        UnmixedTaskSampler(TASKS, WEIGHTS, seed=0, start_iterations=starts)
