"""The bytes the ISP core really sends equal the formula, for several layouts and settings."""

import itertools

from tests.support.dist_harness import run_ranks
from tests.support import schedule_cases


def test_counted_bytes_equal_formula_world_4() -> None:
    cases = [(sp, wp, ckpt, micro, overlap, packed)
             for (sp, wp), ckpt, micro, overlap, packed in itertools.product(
                 [(2, 2), (4, 1), (1, 4), (2, 4), (4, 4)], (0.0, 2 / 3), (1, 2), (False, True), (True,))]
    cases += [(2, 2, 1.0, 2, True, False), (4, 2, 1 / 3, 1, False, False)]
    results = run_ranks(4, schedule_cases.counted_vs_predicted, cases)
    for rank_results in results:
        for case, counted, predicted in rank_results:
            assert counted == predicted, f"{case}: counted {counted} != predicted {predicted}"
    # the formula is not vacuous: a layout with both groups uses every kind
    _, counted, _ = results[0][0]
    assert {"weight", "sequence", "weight_data", "world"} <= set(counted)
