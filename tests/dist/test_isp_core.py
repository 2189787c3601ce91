"""isp_core against a plain single-process model, on real gloo processes (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.support import isp_cases
from tests.support import schedule_cases
from tests.support.dist_harness import run_ranks
from isp_core.memory_pool import ISPCommModelConfig, MemoryPool
from isp_core.topology import check_sizes, group_layout

LAYOUTS_4 = [(2, 2), (2, 4), (4, 2), (4, 4), (1, 4), (4, 1)]
LAYOUTS_2 = [(2, 2), (1, 2), (2, 1)]


def test_group_layout_matches_internevo() -> None:
    groups = group_layout(8, sp=2, wp=4)
    assert groups["sequence"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["data"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["weight"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["weight_data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("sizes", [(8, 3, 2), (8, 2, 3), (4, 0, 1), (6, 4, 2)])
def test_invalid_sizes_name_the_sizes(sizes: tuple[int, int, int]) -> None:
    world_size, sp, wp = sizes
    with pytest.raises(ValueError, match=rf"(sp={sp}|wp={wp})"):
        check_sizes(world_size, sp, wp)


def test_world_size_1_equals_reference() -> None:
    run_ranks(1, isp_cases.check_gradients, [(1, 1)])
    run_ranks(1, isp_cases.check_training, [(1, 1)])


def test_world_size_2_gradients_and_training_equal_reference() -> None:
    run_ranks(2, isp_cases.check_gradients, LAYOUTS_2)
    run_ranks(2, isp_cases.check_training, LAYOUTS_2)


def test_world_size_4_gradients_and_training_equal_reference() -> None:
    report = run_ranks(4, isp_cases.check_gradients, LAYOUTS_4)[0]
    assert len(report) == len(LAYOUTS_4) * 3 * 3 * 2
    run_ranks(4, isp_cases.check_training, LAYOUTS_4)


@pytest.mark.parametrize("memory_pool", [False, True])
def test_prefetch_schedule_order(memory_pool: bool) -> None:
    results = run_ranks(2, schedule_cases.record_schedule, [0.0, 1 / 3, 2 / 3, 1.0], memory_pool)
    for ckpt_blocks, events in results[0]:
        want = schedule_cases.expected_schedule(3, ckpt_blocks)
        assert events == want, f"ckpt_blocks={ckpt_blocks}: first difference at " + \
            str(next((i, e, w) for i, (e, w) in enumerate(zip(events, want)) if e != w) if
                any(e != w for e, w in zip(events, want)) else (len(events), len(want)))
    assert results[0] == results[1]


def test_next_block_is_gathered_before_the_output_projection_runs() -> None:
    ckpt_blocks, events = run_ranks(2, schedule_cases.record_schedule, [0.0], False)[0][0]
    for b in range(2):
        wait_wo = events.index(("wait", f"{b}.attention.wo"))
        launches = [events.index(("launch", f"{b + 1}.{m}")) for m in schedule_cases.MODULES]
        assert max(launches) < wait_wo
        assert min(launches) > events.index(("release", f"{b}.attention.wqkv"))


def test_memory_pool_bytes_and_no_leak_over_steps() -> None:
    info = run_ranks(2, schedule_cases.pool_accounting)[0]
    full = sum(torch.Size(s).numel() for s in info["shapes"].values()) * info["element_size"]
    assert info["bytes"]["all_gather"] == 2 * full
    assert info["shapes"]["attention.wqkv"] == (64, 32)


def test_memory_pool_never_hands_out_a_buffer_in_use() -> None:
    conf = ISPCommModelConfig(module_shapes={"wqkv": torch.Size((8, 4)), "wo": torch.Size((4, 4))})
    pool = MemoryPool(conf, with_bias=True)
    a = pool.allocate_all_gather_memory(0, "wqkv", owner="block 0")
    b = pool.allocate_all_gather_memory(1, "wqkv", owner="block 1")
    assert a.data_ptr() != b.data_ptr() and a.shape == (8, 4)
    with pytest.raises(RuntimeError, match="still in use by 'block 0'"):
        pool.allocate_all_gather_memory(2, "wqkv")
    pool.release_all_gather_memory(0, "wqkv")
    assert pool.allocate_all_gather_memory(2, "wqkv").data_ptr() == a.data_ptr()
    with pytest.raises(RuntimeError, match="twice"):
        pool.release_all_gather_memory(1, "wqkv") or pool.release_all_gather_memory(1, "wqkv")
    r1 = pool.allocate_reduce_scatter_memory((2, 4))
    r2 = pool.allocate_reduce_scatter_memory((2, 4))
    assert r1.data_ptr() != r2.data_ptr()
    pool.free_reduce_scatter_memory((2, 4), r1.index)
    assert pool.allocate_reduce_scatter_memory((2, 4)) is r1
    held = pool.bytes_held()
    assert held["all_gather"] == 2 * (32 + 16 + 8 + 4) * 4
    assert held["reduce_scatter"] == 2 * 8 * 4


def test_model_chunks_and_forward_prefetch_prerequisites() -> None:
    got = run_ranks(2, schedule_cases.chunks_and_prerequisites)
    want = run_ranks(2, schedule_cases.chunk_reference)
    for rank in range(2):
        result = got[rank]
        # the prerequisite ran before each forward prefetch of each block of each chunk, in order
        assert [b for _, b in result["seen"]] == [b for chunk in result["blocks"] for b in chunk]
        # each chunk's schedule used its own modules: 2 chunks x 2 blocks x 5 linears launched
        # in forward, again in backward (block 1) and in the recompute (block 0)
        assert len(result["launches"]) == 2 * (2 * 5 + 5 + 5)
        for g, w in zip(result["grads"], want[rank]):
            assert torch.allclose(torch.tensor(g), torch.tensor(w), rtol=1e-5, atol=1e-7)


def test_communicator_wrapper() -> None:
    result = run_ranks(2, schedule_cases.wrapper_case)[0]
    assert result["prerequisites"] == [1, 1]
    assert len(result["pending"]) == 2 * 5 and result["pending"][0] == "0.0.attention.wo.weight"
    assert result["after"] == 0 and result["grad_set"]
