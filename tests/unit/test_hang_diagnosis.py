"""The hang's explanation from real ring files (written as four ranks would, read as the runner
reads them): who holds the others up, where everyone is, across nodes."""

from __future__ import annotations

import json
from pathlib import Path

from bench.sweep import hang
from bench.sweep.hang_diagnosis import diagnose, span, summary
from bench.sweep.launch import CellPaths, Outcome
from bench.worker.collective_ring import CollectiveRing, read_ring

WEIGHT = (0, 1, 2, 3)


def write_rank(folder: Path, rank: int, node: int, launches: list[tuple[str, tuple[int, ...], str, str]]) -> Path:
    """launches: (group, ranks, kind, how) with how done | waiting | in flight."""
    ring = CollectiveRing(folder / f"rank{rank}.ring", rank, 4, node)
    for group, ranks, kind, how in launches:
        token = ring.issue(group, ranks, kind, 64)
        if how in ("done", "waiting"):
            ring.waiting(token)
        if how == "done":
            ring.done(token)
    ring.close()
    return folder / f"rank{rank}.ring"


def infos(folder: Path, processes: dict[int, str] | None = None) -> dict[int, dict]:
    out = {}
    for path in sorted(folder.glob("rank*.ring")):
        ring = read_ring(path)
        out[ring["rank"]] = hang.rank_info(ring, (processes or {}).get(ring["rank"], "running"), ring["entries"][-1]
                                           ["issued_ns"] if ring["entries"] else 0)
    return out


def gathers(n: int, last: str = "done") -> list[tuple[str, tuple[int, ...], str, str]]:
    return [("weight", WEIGHT, "all_gather", "done")] * (n - 1) + [("weight", WEIGHT, "all_gather", last)]


def test_a_stopped_rank_outside_collectives_holds_the_others(tmp_path: Path) -> None:
    for r in (0, 1, 2):
        write_rank(tmp_path, r, r // 2, gathers(5, "waiting"))
    write_rank(tmp_path, 3, 1, gathers(4))
    result = diagnose(infos(tmp_path, {3: "stopped"}), 4)
    assert result["reason"] == ("rank 3 (node 1, stopped) past all_gather #4 on weight group [0..3]; "
                                "ranks 0-2 wait in all_gather #5 on weight group [0..3]")
    assert result["stuck"] == [3] and result["behind"] == {"3": [0, 1, 2]}


def test_a_chain_through_two_groups_ends_at_the_rank_computing(tmp_path: Path) -> None:
    seq0, seq1 = ("sequence", (0, 1)), ("sequence", (2, 3))
    write_rank(tmp_path, 0, 0, gathers(7, "waiting"))
    write_rank(tmp_path, 1, 0, gathers(6) + [(*seq0, "all_to_all", "waiting")])
    write_rank(tmp_path, 2, 0, gathers(7, "waiting"))
    write_rank(tmp_path, 3, 0, gathers(6) + [(*seq1, "all_to_all", "done")])
    result = diagnose(infos(tmp_path), 4)
    # rank 1 waits for rank 0 on its sequence group (0 is in the weight gather), ranks 0 and 2
    # for ranks 1 and 3 on the weight group; rank 3 waits in nothing: it is where the hang is.
    assert result["reason"] == ("rank 3 (node 0) past all_to_all #1 on sequence group [2,3]; "
                                "ranks 0,2 wait in all_gather #7 on weight group [0..3]; "
                                "rank 1 waits in all_to_all #1 on sequence group [0,1]"), result["reason"]


def test_every_member_in_the_same_collective_blames_the_transport(tmp_path: Path) -> None:
    for r in range(4):
        write_rank(tmp_path, r, 0, gathers(3, "waiting"))
    result = diagnose(infos(tmp_path), 4)
    assert result["stuck"] == [] and "not completed: the transport, not a rank, is stuck" in result["reason"]
    assert result["reason"].startswith("ranks 0-3 wait in all_gather #3 on weight group [0..3]")


def test_a_rank_without_a_ring_and_a_rank_that_exited(tmp_path: Path) -> None:
    for r in (0, 1):
        write_rank(tmp_path, r, 0, gathers(2, "waiting"))
    write_rank(tmp_path, 2, 1, gathers(1))
    result = diagnose(infos(tmp_path, {2: "exited"}), 4)
    assert result["stuck"] == [2, 3] and result["missing"] == [3]
    assert result["reason"] == ("rank 2 (node 1, exited) past all_gather #1 on weight group [0..3]; "
                                "rank 3 (no ring: never started, or its node sent nothing); "
                                "ranks 0-1 wait in all_gather #2 on weight group [0..3]")
    # torchrun ended the others when rank 2 died: they died waiting, rank 2 is still the one named
    gone = diagnose(infos(tmp_path, {0: "exited", 1: "exited", 2: "exited"}), 4)
    assert gone["stuck"] == [2, 3] and gone["reason"].endswith(
        "ranks 0-1 waited in all_gather #2 on weight group [0..3] (then exited)")


def test_no_rank_waiting_and_waits_out_of_sight(tmp_path: Path) -> None:
    for r in range(4):
        write_rank(tmp_path, r, 0, gathers(2))
    assert diagnose(infos(tmp_path), 4)["reason"] == ("no rank is waiting in a collective "
                                                      "(ranks 0-3 outside collectives)")
    # DDP's reducer waits in C++: a bucket launched and never completed stands for the wait.
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    write_rank(ddp, 0, 0, [("world", (0, 1), "all_reduce", "done"), ("world", (0, 1), "all_reduce", "in flight")])
    write_rank(ddp, 1, 0, [("world", (0, 1), "all_reduce", "done")])
    assert diagnose(infos(ddp), 2)["reason"].startswith("rank 1 (node 0) past all_reduce #1 on world group [0,1]; "
                                                        "rank 0 waits in all_reduce #2 on world group [0,1]")


def test_node_0_explains_over_every_node_s_ranks(tmp_path: Path) -> None:
    paths = CellPaths(tmp_path / "config.json", tmp_path / "result.json", tmp_path / "logs")
    paths.log_dir.mkdir()
    (tmp_path / "n0").mkdir()
    (tmp_path / "n1").mkdir()
    for r in (0, 1, 2):
        write_rank(tmp_path / f"n{r // 2}", r, r // 2, gathers(5, "waiting"))
    write_rank(tmp_path / "n1", 3, 1, gathers(4))
    for node, stopped in ((0, {}), (1, {3: "stopped"})):  # as each node's runner writes its file
        doc = {"node": node, "host": "h", "ranks": list(infos(tmp_path / f"n{node}", stopped).values())}
        error = hang.explain(paths, {"reason": "timeout after 9s"}, doc, timed_out=True, rewrite=False)
        assert error["reason"] == "timeout after 9s" and "hang" in error  # one node's view: detail only
    assert sorted(p.name for p in paths.log_dir.iterdir()) == ["hang.node0.json", "hang.node1.json"]
    merged = Outcome("timeout", None, {"reason": "node 0: timeout after 9s; node 1: timeout after 9s"}, 10.0)
    error = hang.across_nodes(merged, paths).error
    assert error["reason"] == ("rank 3 (node 1, stopped) past all_gather #4 on weight group [0..3]; "
                               "ranks 0-2 wait in all_gather #5 on weight group [0..3] "
                               "(node 0: timeout after 9s; node 1: timeout after 9s)")
    assert error["hang"]["stuck"] == [3] and [r["rank"] for r in error["hang"]["ranks"]] == [0, 1, 2, 3]
    assert json.loads((paths.log_dir / "hang.node1.json").read_text())["cause"] == "timeout after 9s"
    ok = Outcome("ok", {}, None, 1.0)
    assert hang.across_nodes(ok, paths) is ok and summary([]) is None


def test_span() -> None:
    assert span([3]) == "rank 3" and span([0, 1, 2, 5, 7, 8]) == "ranks 0-2,5,7-8"
