"""Plan every cell of a sweep config and its peers, and rank the layouts.

For each ISP cell the peers are planned on the same model, tokens and world size: fsdp2 and
ddp (sp = wp = 1), and ulysses (sp = the largest divisor of the world size that the heads and
kv heads allow, wp = 1). A peer whose batch does not split (global_batch must divide by
dp x micro_num) is reported as not plannable, with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.plan.predict import PlanInputs, Prediction, predict

PEERS = ("fsdp2", "ddp", "ulysses")


@dataclass
class Plan:
    predictions: list[Prediction]
    skipped: list[tuple[str, str]]  # (cell, why)

    def ranking(self) -> list[Prediction]:
        """Fitting layouts by throughput (tokens/s; cells may differ in batch), best first, then
        those that do not fit."""
        return sorted(self.predictions, key=lambda p: (not p.fits, -p.tokens_per_s))


def _ulysses_sp(world: int, heads: int, kv_heads: int) -> int:
    for sp in range(world, 0, -1):
        if world % sp == 0 and heads % sp == 0 and (sp <= kv_heads and kv_heads % sp == 0 or sp % kv_heads == 0):
            return sp
    return 1


def _peer(config: Any, strategy: str) -> Any:
    world = config.parallel.world_size
    sp = _ulysses_sp(world, config.model.heads, config.model.kv_heads) if strategy == "ulysses" else 1
    parallel = dataclasses.replace(config.parallel, strategy=strategy, sp=sp, wp=1)
    return dataclasses.replace(config, parallel=parallel)


def plan_cells(cells: list[tuple[str, Any]], inputs: PlanInputs, peers: bool = True) -> Plan:
    """`cells`: (id, CellConfig). Training cells only; collectives cells are skipped."""
    out, skipped = [], []
    seen = {_peer_key(c.parallel.strategy, c) for _, c in cells}  # peers the config lists itself
    for cell_id, config in cells:
        if getattr(config.run, "kind", "training") != "training":
            skipped.append((cell_id, "a collectives cell"))
            continue
        _add(out, skipped, cell_id, config, inputs)
        if not peers or config.parallel.strategy != "isp":
            continue
        for strategy in PEERS:
            key = _peer_key(strategy, config)
            if key in seen:
                continue
            seen.add(key)
            peer_id = f"{strategy}@{cell_id}"  # the peer on this cell's model, tokens and world
            try:
                peer = _peer(config, strategy)
            except ValueError as exc:  # ConfigError is a ValueError: the peer's layout is invalid
                skipped.append((peer_id, str(exc).splitlines()[0]))
                continue
            _add(out, skipped, peer_id, peer, inputs)
    return Plan(out, skipped)


def _peer_key(strategy: str, config: Any) -> tuple:
    return strategy, config.parallel.world_size, repr(config.model), repr(config.data), config.run.dtype


def _add(out: list[Prediction], skipped: list[tuple[str, str]], cell_id: str, config: Any,
         inputs: PlanInputs) -> None:
    try:
        out.append(predict(cell_id, config, inputs))
    except ValueError as exc:
        skipped.append((cell_id, str(exc)))
