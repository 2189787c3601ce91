"""ISP's variants (issue 12) on real gloo processes: wp_unit, head, forward prefetch options,
and InternEvo's calling conventions with plain torch ProcessGroups."""

from __future__ import annotations

import pytest

from tests.support import variant_cases
from tests.support.dist_harness import run_ranks

BLOCK = {"wp_unit": "block"}
GATHERED = {"head": "gathered"}
OV, POOL = {"overlap": True}, {"overlap": True, "memory_pool": True}
NO_EMB_BWD = {"embedding_backward_gather": False}  # the saving InternEvo could take

# (sp, wp, settings, checkpoint fraction, micro_num): every variant, several layouts, with and
# without overlap, pool, recompute and gradient accumulation.
VARIANT_CASES_4 = [
    (2, 4, BLOCK, 0.0, 1), (4, 2, {**BLOCK, **OV}, 2 / 3, 2), (2, 2, {**BLOCK, **POOL}, 1.0, 1),
    (1, 4, {**BLOCK, **POOL}, 1 / 3, 2), (4, 4, {**BLOCK, **GATHERED, **OV}, 0.0, 2),
    (2, 4, GATHERED, 2 / 3, 1), (4, 1, {**GATHERED, **OV}, 0.0, 1), (4, 2, {**GATHERED, **POOL}, 1.0, 2),
    (2, 2, {**OV, "forward_overlap_per": "module"}, 2 / 3, 1),
    (4, 4, {**BLOCK, **POOL, "forward_overlap_per": "module"}, 1 / 3, 1),
    (2, 4, {**POOL, "launch_allgather_before": "wqkv"}, 2 / 3, 1),
    (4, 2, {**OV, "launch_allgather_before": "attn"}, 1 / 3, 2),
    (2, 2, {**BLOCK, **OV, "launch_allgather_before": "w1"}, 1.0, 1),
    (2, 2, {**POOL, **NO_EMB_BWD}, 2 / 3, 2),
]


def test_every_variant_equals_one_process_world_4() -> None:
    report = run_ranks(4, variant_cases.check_variants, VARIANT_CASES_4)[0]
    assert len(report) == len(VARIANT_CASES_4)


def test_variants_equal_one_process_world_2() -> None:
    cases = [(2, 2, {**BLOCK, **GATHERED, **POOL}, 2 / 3, 2), (1, 2, {**BLOCK, **OV}, 0.0, 1),
             (2, 1, {**GATHERED, **OV, "forward_overlap_per": "module"}, 1 / 3, 1)]
    run_ranks(2, variant_cases.check_variants, cases)


OPTIONS = [(unit, per, launch, ckpt, False)
           for unit in ("module", "block")
           for per, launch in (("layer", "wo"), ("layer", "wqkv"), ("layer", "attn"), ("layer", "w1"),
                               ("module", "wo"))
           for ckpt in (0.0, 2 / 3, 1.0)]
OPTIONS += [("block", "layer", "wo", 1 / 3, True), ("module", "module", "wo", 2 / 3, True),
            ("block", "module", "wo", 1.0, True), ("module", "layer", "w1", 1 / 3, True)]


@pytest.fixture(scope="module")
def recorded() -> list:
    """One micro-step's schedule for every option, on each of 2 ranks (one spawn for both tests)."""
    return run_ranks(2, variant_cases.record_events, OPTIONS)


def test_event_order_for_every_prefetch_option(recorded: list) -> None:
    assert recorded[0] == recorded[1]
    for (unit, per, launch, ckpt_blocks), events in recorded[0]:
        want = variant_cases.expected_events(3, ckpt_blocks, unit, per, launch)
        assert events == want, (f"{unit}/{per}/{launch} ckpt_blocks={ckpt_blocks}: first difference at "
                                f"{next((i, e, w) for i, (e, w) in enumerate(zip(events, want)) if e != w)}")


def test_prefetch_options_move_the_launch_point(recorded: list) -> None:
    """Hand-checked facts the schedule generator must also satisfy (no recompute)."""
    results = dict(recorded[0])
    for launch, before, after in (("wqkv", None, "0.attention.wqkv"), ("attn", "0.attention.wqkv", "0.attention.wo"),
                                  ("wo", "0.attention.wqkv", "0.attention.wo"),
                                  ("w1", "0.attention.wo", "0.feed_forward.w1")):
        ev = results[("module", "layer", launch, 0)]
        first_next = ev.index(("launch", "1.attention.wqkv"))
        assert first_next < ev.index(("wait", after)), launch
        if before is not None:
            assert first_next > ev.index(("release", before)), launch
    block = results[("block", "layer", "wo", 0)]
    assert [e for e in block if e[0] == "launch"] == [("launch", f"{b}.block") for b in (0, 1, 2, 2, 1, 0)]
    per_module = results[("module", "module", "wo", 0)]
    assert per_module[:4] == [("launch", "0.attention.wqkv"), ("wait", "0.attention.wqkv"),
                              ("launch", "0.attention.wo"), ("release", "0.attention.wqkv")]


def test_counted_bytes_equal_formula_for_each_variant() -> None:
    cases = [(sp, wp, ckpt, micro, settings)
             for sp, wp in ((2, 2), (4, 4))
             for settings in (BLOCK, {**BLOCK, **POOL}, GATHERED, {**BLOCK, **GATHERED, **OV},
                              {**OV, "forward_overlap_per": "module"}, NO_EMB_BWD, {**BLOCK, **OV, **NO_EMB_BWD})
             for ckpt, micro in ((0.0, 1), (2 / 3, 2))]
    results = run_ranks(4, variant_cases.counted_vs_predicted, cases)
    for rank_results in results:
        for case, counted, predicted in rank_results:
            assert counted == predicted, f"{case}: counted {counted} != predicted {predicted}"
    by_case = {case[:4] + (tuple(sorted(case[4].items())),): counted for case, counted, _ in results[0]}
    block = by_case[(2, 2, 0.0, 1, tuple(sorted(BLOCK.items())))]["weight"]
    assert block["all_gather"]["calls"] == 2 * 3 + 2 + 2  # 2 per block, head 2, embedding 2 (InternEvo's)
    # the variant saves one gather of the table per micro-step, vocab x hidden x 4 bytes each
    # (with wp_unit block, overlap changes no count: BLOCK and BLOCK+OV+NO_EMB_BWD differ by it alone)
    key = lambda settings: tuple(sorted(settings.items()))  # noqa: E731
    for sp, wp, ckpt, micro in ((2, 2, 0.0, 1), (4, 4, 2 / 3, 2)):
        internevo = by_case[(sp, wp, ckpt, micro, key(BLOCK))]["weight"]["all_gather"]
        lean = by_case[(sp, wp, ckpt, micro, key({**BLOCK, **OV, **NO_EMB_BWD}))]["weight"]["all_gather"]
        assert internevo["calls"] - lean["calls"] == micro
        assert internevo["bytes"] - lean["bytes"] == micro * 64 * 32 * 4
    assert "all_to_all" in by_case[(2, 2, 0.0, 1, tuple(sorted(BLOCK.items())))]["sequence"]
    gathered = by_case[(2, 2, 0.0, 1, tuple(sorted(GATHERED.items())))]["sequence"]
    assert gathered["all_to_all"]["calls"] == 6 * 3 and "all_reduce" not in gathered


def test_seed_calling_conventions_and_process_groups() -> None:
    results = run_ranks(2, variant_cases.process_group_cases)
    calls = results[0]["attention"]
    # what the local attention receives: sequence whole (16), heads split over sp=2
    assert calls["qkv/False"] == [([(1, 16, 3, 2, 8)], [])]
    assert calls["q_kv/False"] == [([(1, 16, 2, 8), (1, 16, 2, 1, 8)], [])]
    assert calls["q_k_v/False"] == [([(1, 16, 2, 8), (1, 16, 1, 8), (1, 16, 1, 8)], [])]
    assert calls["qkv/True"] == [([(1, 16, 3, 2, 8), (4,), 6], [])]
    assert calls["q_kv/True"] == [([(1, 16, 2, 8), (1, 16, 2, 1, 8), (4,), (4,), 6, 6], [])]
    assert calls["q_k_v/True"] == [([(1, 16, 2, 8), (1, 16, 1, 8), (1, 16, 1, 8), (4,), (4,), 6, 6], [])]
    assert calls["q_kv_keywords/True"][0][1] == ["cu_seqlens_k", "cu_seqlens_q", "max_seqlen_k", "max_seqlen_q"]
    assert calls["seq_all_to_all_shape"] == (1, 4, 2, 1)
    # ISPCommunicator, head and embedding communicators on plain ProcessGroups train alike
    for result in results:
        assert result["communicators"] == {"same": True, "size": 2}


@pytest.mark.parametrize("kwargs, match", [({"wp_unit": "layer"}, "wp_unit"),
                                           ({"forward_overlap_per": "block"}, "forward_overlap_per"),
                                           ({"launch_allgather_before": "w2"}, "launch_allgather_before")])
def test_bad_options_name_the_option(kwargs: dict, match: str) -> None:
    from isp_core.engine import ISPSettings, build_isp_model
    from isp_core.model import LlamaConfig
    from isp_core.topology import ParallelTopology

    with pytest.raises(ValueError, match=match):
        build_isp_model(LlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, vocab=64, mlp_hidden=48),
                        ParallelTopology(1, 1, 1), ISPSettings(**kwargs))
    with pytest.raises(ValueError, match="head"):
        ISPSettings(head="vocab")
