"""The pure scheduling decisions, with plain numbers for time."""

from __future__ import annotations

import math

from service.scheduling import (
    Candidate,
    Dispatch,
    Queued,
    Waiting,
    backlog_ms,
    choose_variant,
    next_stream_column,
    pick_queue,
    plan_batch,
    predict_completion_ms,
    quickest_within,
    run_on_loop,
    spare_for,
)

COST = {
    "column_1": 5.0,
    "column_2": 20.0,
    "column_3": 60.0,
    "column_4": 150.0,
    "column_2_int8": 12.0,
}
CANDIDATES = [
    Candidate("column_1", 1, "fp32", 0.70),
    Candidate("column_2", 2, "fp32", 0.80),
    Candidate("column_3", 3, "fp32", 0.85),
    Candidate("column_4", 4, "fp32", 0.88),
]


def flat(key: str, n: int) -> float:
    return COST[key] * (1 + 0.1 * (n - 1))


def alone(c: Candidate) -> float:
    return COST[c.key]


def test_choose_the_most_accurate_that_fits() -> None:
    assert choose_variant(CANDIDATES, math.inf, alone).key == "column_4"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, 150.0, alone).key == "column_4"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, 149.9, alone).key == "column_3"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, 19.99, alone).key == "column_1"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, 4.99, alone) is None


def test_the_last_chance_is_the_quickest_variant_within_the_looser_budget() -> None:
    """When no choice fits the budget less the full margin, a request is refused only if
    not even its quickest variant fits the budget less the (smaller) refusal margin."""
    assert choose_variant(CANDIDATES, 4.0, alone) is None
    assert quickest_within(CANDIDATES, 5.0, alone).key == "column_1"  # type: ignore[union-attr]
    assert quickest_within(CANDIDATES, 4.99, alone) is None
    assert quickest_within([], math.inf, alone) is None
    # Equally quick: the cheaper (fp32 before int8), whatever the order given.
    twins = [Candidate("column_1_int8", 1, "int8", 0.72), Candidate("column_1", 1, "fp32", 0.7)]
    assert quickest_within(twins, 5.0, lambda c: 5.0).key == "column_1"  # type: ignore[union-attr]
    # Queue-aware: the quickest to finish, not the cheapest to run.
    ahead = {"column_1": 30.0, "column_2": 20.0, "column_3": 60.0, "column_4": 150.0}
    assert quickest_within(CANDIDATES, 25.0, lambda c: ahead[c.key]).key == "column_2"  # type: ignore[union-attr]


def test_a_thrifty_choice_takes_what_finishes_first() -> None:
    """A busy server gives up accuracy before answers: the quickest variant that fits (the
    more accurate of equally quick ones), still None when nothing fits."""
    assert choose_variant(CANDIDATES, math.inf, alone, 0.0).key == "column_1"  # type: ignore[union-attr]
    twins = [Candidate("column_1", 1, "fp32", 0.7), Candidate("column_1_int8", 1, "int8", 0.72)]
    assert choose_variant(twins, 10.0, lambda c: 5.0, 0.0).key == "column_1_int8"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, 4.99, alone, 0.0) is None


def test_a_thrifty_choice_takes_accuracy_that_costs_little_time() -> None:
    """Within `thrifty_within_ms` of the quickest, the most accurate competes: column 2
    finishes 15 ms after column 1, column 3 55 ms after."""
    assert choose_variant(CANDIDATES, math.inf, alone, 14.9).key == "column_1"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, math.inf, alone, 15.0).key == "column_2"  # type: ignore[union-attr]
    assert choose_variant(CANDIDATES, math.inf, alone, 55.0).key == "column_3"  # type: ignore[union-attr]
    # The budget still rules: within the margin but not in time is out.
    assert choose_variant(CANDIDATES, 19.9, alone, 55.0).key == "column_1"  # type: ignore[union-attr]


def test_int8_wins_only_on_accuracy() -> None:
    int8_good = Candidate("column_2_int8", 2, "int8", 0.80)
    int8_worse = Candidate("column_2_int8", 2, "int8", 0.79)
    # Equal accuracy: the fp32 one is preferred when both fit.
    assert choose_variant([*CANDIDATES[:2], int8_good], 25, alone).key == "column_2"  # type: ignore[union-attr]
    # Only the faster int8 fits: it serves.
    assert choose_variant([*CANDIDATES[:2], int8_worse], 15, alone).key == "column_2_int8"  # type: ignore[union-attr]


def test_accuracies_within_the_tie_count_as_equal() -> None:
    """An int8 variant one test image more accurate than its fp32 column is a tie, and
    fp32 serves; beyond the tie accuracy rules again, and the tie never makes a variant
    that does not fit serve."""
    column_4, column_4_int8 = (
        Candidate("column_4", 4, "fp32", 0.8550),
        Candidate("column_4_int8", 4, "int8", 0.8551),
    )
    pair = [column_4, column_4_int8]
    assert choose_variant(pair, math.inf, lambda c: 1.0).key == "column_4_int8"  # type: ignore[union-attr]
    assert choose_variant(pair, math.inf, lambda c: 1.0, None, 0.001).key == "column_4"  # type: ignore[union-attr]
    assert choose_variant(pair, math.inf, lambda c: 1.0, None, 0.00005).key == "column_4_int8"  # type: ignore[union-attr]
    # Within the tie, the deeper column serves even when a shallower one measured higher.
    close = [Candidate("column_3", 3, "fp32", 0.856), column_4]
    assert choose_variant(close, math.inf, alone, None, 0.001).key == "column_4"  # type: ignore[union-attr]
    assert choose_variant(close, 100.0, alone, None, 0.001).key == "column_3"  # type: ignore[union-attr]
    # Thrifty: among the quick ones, the same tie.
    assert choose_variant(pair, math.inf, lambda c: 1.0, 0.0, 0.001).key == "column_4"  # type: ignore[union-attr]
    # Three-way: the tie is measured from the best, not chained.
    chain = [
        Candidate("column_2", 2, "fp32", 0.8540),
        Candidate("column_3", 3, "fp32", 0.8548),
        Candidate("column_1", 1, "fp32", 0.8556),
    ]
    assert choose_variant(chain, math.inf, lambda c: 1.0, None, 0.001).key == "column_3"  # type: ignore[union-attr]


def test_two_views_win_only_on_accuracy() -> None:
    """A two-view variant costs twice its column: at equal accuracy the single view
    serves; a more accurate two-view variant serves when it fits."""
    equal = Candidate("column_2_flip", 2, "fp32", 0.80, views=2)
    better = Candidate("column_2_flip", 2, "fp32", 0.83, views=2)
    cost = {**COST, "column_2_flip": 2 * COST["column_2"]}

    def paid(c: Candidate) -> float:
        return cost[c.key]

    assert choose_variant([*CANDIDATES[:2], equal], math.inf, paid).key == "column_2"  # type: ignore[union-attr]
    pair = [*CANDIDATES[:2], better]
    assert choose_variant(pair, 40, paid).key == "column_2_flip"  # type: ignore[union-attr]
    assert choose_variant(pair, 39.9, paid).key == "column_2"  # type: ignore[union-attr]


def test_a_costlier_choice_needs_room_before_the_next_arrival() -> None:
    # 4 ms more, arrivals 50 ms apart: 0.08 expected meanwhile.
    assert spare_for(4.0, 50.0, 0.1)
    assert not spare_for(4.0, 5.0, 0.1)  # 0.8 expected
    assert spare_for(4.0, math.inf, 0.1)  # no arrivals yet
    assert spare_for(0.0, 0.0, 0.0)


def test_best_effort_falls_back_to_the_cheapest_variant() -> None:
    variants = [
        Candidate("column_1_flip", 1, "fp32", 0.72, views=2),
        Candidate("column_1_int8", 1, "int8", 0.70),
        Candidate("column_2", 2, "fp32", 0.8),
        Candidate("column_1", 1, "fp32", 0.70),
    ]
    assert min(variants, key=Candidate.cheapness).key == "column_1"


def test_accuracy_ranks_above_depth() -> None:
    odd = [Candidate("column_1", 1, "fp32", 0.9), Candidate("column_2", 2, "fp32", 0.8)]
    assert choose_variant(odd, math.inf, alone).key == "column_1"  # type: ignore[union-attr]


def test_completion_counts_work_ahead_and_batches_with_its_own_variant() -> None:
    # Nothing queued: the run alone.
    assert predict_completion_ms("column_2", 1, [], 0.0, flat, 32) == 20.0
    # A running batch with 7 ms left, then our run.
    assert predict_completion_ms("column_2", 1, [], 7.0, flat, 32) == 27.0
    # Three column-2 images ahead ride in the same batch of 4.
    assert predict_completion_ms("column_2", 1, [Waiting("column_2", 3)], 0.0, flat, 32) == flat(
        "column_2", 4
    )
    # Other variants' work is paid for in full batches' amortised share.
    ahead = [Waiting("column_4", 2)]
    assert predict_completion_ms("column_1", 1, ahead, 0.0, flat, 32) == flat("column_4", 2) + 5.0
    # Two workers share the work ahead.
    assert (
        predict_completion_ms("column_1", 1, ahead, 0.0, flat, 32, workers=2)
        == flat("column_4", 2) / 2 + 5.0
    )


def test_completion_spills_into_a_second_batch() -> None:
    ahead = [Waiting("column_1", 32)]
    assert predict_completion_ms("column_1", 1, ahead, 0.0, flat, 32) == flat(
        "column_1", 32
    ) + flat("column_1", 1)


def test_stream_order_aims_at_the_deepest_that_fits() -> None:
    # 100 ms: column 3 is the target; column 2 (20) + column 3 (60) = 80 fits on the way.
    assert next_stream_column(CANDIDATES, 1, 100, alone).column == 2  # type: ignore[union-attr]
    # 70 ms: column 2 then 3 would be 80: skip column 2.
    assert next_stream_column(CANDIDATES, 1, 70, alone).column == 3  # type: ignore[union-attr]
    # After column 3 with 80 ms left, column 4 (150) does not fit: the stream ends.
    assert next_stream_column(CANDIDATES, 3, 80, alone) is None
    # No deadline: every column in order.
    assert next_stream_column(CANDIDATES, 2, math.inf, alone).column == 3  # type: ignore[union-attr]
    assert next_stream_column(CANDIDATES, 4, math.inf, alone) is None


def test_plan_batch_takes_edf_order_up_to_max_batch() -> None:
    queue = [Queued(1.0 + i, 1, 0.0) for i in range(40)]
    assert plan_batch(queue, 0.0, lambda n: 1.0, 32, 0.0) == Dispatch(32)
    multi = [Queued(1.0, 20, 0.0), Queued(2.0, 20, 0.0)]
    assert plan_batch(multi, 0.0, lambda n: 1.0, 32, 0.0) == Dispatch(1)
    assert plan_batch([], 0.0, lambda n: 1.0, 32, 0.0) == Dispatch(0)


def test_plan_batch_stops_at_the_predicted_run_time_cap() -> None:
    """With `max_run_ms`, a batch takes only what is predicted to run within it (at least
    its first request, however long that takes), and a batch at the cap does not wait."""
    queue = [Queued(1.0 + i, 1, 0.0) for i in range(10)]
    per_image = lambda n: 2.0 * n  # noqa: E731
    assert plan_batch(queue, 0.0, per_image, 32, 0.0, max_run_ms=6.0) == Dispatch(3)
    assert plan_batch(queue, 0.0, per_image, 32, 0.0, max_run_ms=1.0) == Dispatch(1)
    big = [Queued(1.0, 8, 0.0), Queued(2.0, 1, 0.0)]
    assert plan_batch(big, 0.0, per_image, 32, 0.0, max_run_ms=6.0) == Dispatch(1)
    # Waiting for company is pointless once the next image would cross the cap.
    assert plan_batch(queue[:3], 0.0, per_image, 32, 50.0, max_run_ms=6.0) == Dispatch(3)
    assert plan_batch(queue, 0.0, per_image, 32, 0.0) == Dispatch(10)  # no cap


def test_plan_batch_without_wait_runs_at_once() -> None:
    assert plan_batch([Queued(5.0, 1, 0.0)], 0.0, lambda n: 1.0, 32, 0.0) == Dispatch(1)


def test_plan_batch_waits_for_company_but_never_past_the_slack() -> None:
    queue = [Queued(deadline_s=1.0, images=1, enqueued_s=0.0)]
    # Plenty of slack: wait up to max_wait after arrival.
    plan = plan_batch(queue, 0.0, lambda n: 10.0, 32, max_wait_ms=5.0)
    assert plan == Dispatch(1, wait_until_s=0.005)
    # Slack shorter than max_wait: wait only until the latest start.
    tight = [Queued(deadline_s=0.012, images=1, enqueued_s=0.0)]
    plan = plan_batch(tight, 0.0, lambda n: 10.0, 32, max_wait_ms=5.0)
    assert plan.wait_until_s is not None and abs(plan.wait_until_s - 0.002) < 1e-9
    # Once that moment comes, it runs.
    assert plan_batch(tight, 0.002, lambda n: 10.0, 32, max_wait_ms=5.0) == Dispatch(1)
    # Already late: run now.
    assert plan_batch(tight, 0.05, lambda n: 10.0, 32, max_wait_ms=5.0) == Dispatch(1)


def test_pick_queue_is_edf_across_variants() -> None:
    assert pick_queue({"a": 3.0, "b": 1.0, "c": 2.0}) == "b"
    assert pick_queue({}) is None


def test_run_on_loop_only_when_idle_and_short() -> None:
    assert run_on_loop(1, 2.0, waiting_images=0, running_batches=0, limit_ms=3.0)
    assert run_on_loop(1, 3.0, 0, 0, 3.0)  # at the limit
    assert not run_on_loop(1, 3.1, 0, 0, 3.0)  # too long: the thread runs it
    assert not run_on_loop(1, 1.0, 1, 0, 3.0)  # others wait: the loop must keep parsing
    assert not run_on_loop(1, 1.0, 0, 1, 3.0)  # a batch runs on the thread
    assert not run_on_loop(1, 0.1, 0, 0, 0.0)  # switched off
    assert not run_on_loop(0, 0.1, 0, 0, 3.0)
    assert not run_on_loop(1, 1.0, 0, 0, 3.0, active_requests=2)  # another being served
    assert not run_on_loop(1, 1.0, 0, 0, 3.0, loop_lag_ms=2.5)  # the loop runs behind


def test_backlog_is_the_running_rest_and_queued_work_per_worker() -> None:
    waiting = [Waiting("column_1", 4), Waiting("column_4", 2)]
    cost = {"column_1": 0.5, "column_4": 3.0}

    def cost_ms(key: str, n: int) -> float:
        return cost[key] * n

    assert backlog_ms(1.5, waiting, cost_ms, workers=1) == 1.5 + 4 * 0.5 + 2 * 3.0
    assert backlog_ms(0.0, waiting, cost_ms, workers=2) == 4.0
    assert backlog_ms(0.0, [], cost_ms, workers=1) == 0.0
