"""The end of an ISP step: the data-parallel gradient reduction and the optimizer, per framework.

bench      isp_core.engine.ISPTrainer: after the last micro-step's backward, one flat all-reduce
           (AVG) of the weight shards' gradients over the weight-data group and one of the
           norms over the world, both blocking, then AdamW. Nothing overlaps the backward.
internevo  InternEvo's HybridZeroOptimizer (overlap_sync_grad=True, reduce_bucket_size 512 Mi
           gradient elements, its shipped configs; hybrid_zero_optim.py at c628a8c): in the last
           micro-step's backward each gradient, once final (after its weight-group
           reduce-scatter with wp > 1), joins a bucket; a bucket that would overflow goes out
           first: the compute stream copies its gradients into one flat buffer (store.py:315),
           which goes out as an asynchronous all-reduce over the weight-data group, norms
           included; the compute stream then waits for the bucket before it (`handle.wait()`
           after each launch, so at most two are in flight) and copies that one's reduced buffer
           back into the gradients (store.py:318-322). After the backward the last bucket goes,
           all are waited, and the last is copied back. (It also all-reduces each norm's
           gradient over the weight group first: 2L+1 small calls, not modelled.)
Both then step AdamW on the rank's share: with zero1 = z > 1 the states of 1/z of the shard
(InternEvo's float32 partition), after which each of the z owners broadcasts its updated
partition over the zero1 group (overlap_sync_param=False, InternEvo's 7B configs: blocking).
The zero1 group is z consecutive members of the weight-data group (Initializer_Zero1_ISP).
InternEvo's step also passes over its partition's gradients and parameters before and after
AdamW, INTERNEVO_STEP_BYTES per element (see there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.plan.compute import Rates, Work
from bench.plan.memory import BUCKET_ELEMENTS
from bench.plan.replay import Schedule

FRAMEWORKS = ("bench", "internevo")
# HybridZeroOptimizer.step's memory passes per element of the rank's partition besides AdamW's, in
# bytes, with bfloat16 gradients and parameters (hybrid_zero_optim.py and solver/optimizer/utils.py at
# c628a8c): the norm, a float32 copy of each gradient and its L2 (2 read + 4 written + 4 read); the
# partition's gradients flattened (2 + 2), cast to float32 (2 + 4) and unscaled (4 + 4); the float32
# result copied into the bfloat16 parameters (4 + 2).
INTERNEVO_STEP_BYTES = 10 + 4 + 6 + 8 + 6


@dataclass(frozen=True)
class Optim:
    framework: str = "bench"
    zero1: int = 1          # resolved: 1 .. weight-data group size
    bucket_elements: int = BUCKET_ELEMENTS

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"framework {self.framework!r}; allowed: {', '.join(FRAMEWORKS)}")


def zero1_size(zero1: int, wdp: int) -> int:
    """InternEvo's parallel.zero1.size: <= 0 means the whole weight-data group."""
    return wdp if zero1 <= 0 else zero1


@dataclass
class GradSync:
    sched: Schedule
    comm_s: Callable[[str, str, float], float]  # Costs.comm_s: (kind, group, nbytes) -> seconds
    rates: Rates
    element_size: int
    wdp: int
    optim: Optim
    last: bool = False      # set during the last micro-step: gradients are final
    _bucket: int = 0        # gradient elements in the open bucket
    _deps: list[int] = field(default_factory=list)
    _prev: int | None = None
    _prev_bytes: int = 0
    _issued: list[int] = field(default_factory=list)
    bucket_bytes: list[int] = field(default_factory=list)

    @property
    def overlapped(self) -> bool:
        return self.optim.framework == "internevo" and self.wdp > 1

    def ready(self, elements: float, dep: int | None) -> None:
        """`elements` of gradient are final once op `dep` ends (InternEvo: they join a bucket)."""
        if not (self.overlapped and self.last):
            return
        if self._bucket and self._bucket + int(elements) > self.optim.bucket_elements:
            self._launch()
        self._bucket += int(elements)
        if dep is not None:
            self._deps.append(dep)

    def _copy_s(self, nbytes: int) -> float:
        """A copy of `nbytes` of gradients on the compute stream: read once, written once."""
        return 2 * nbytes / self.rates.optimizer_bytes

    def _launch(self) -> None:
        nbytes = self._bucket * self.element_size
        flat = self.sched.compute("ar.bucket.flatten", self._copy_s(nbytes), tuple(self._deps))
        op = self.sched.comm("ar.bucket", "weight_data", "all_reduce", nbytes,
                             self.comm_s("all_reduce", "weight_data", nbytes), False, False, (flat,))
        if self._prev is not None:
            self.sched.wait(self._prev)  # the compute stream waits for the bucket before this one
            self.sched.compute("ar.bucket.copy_back", self._copy_s(self._prev_bytes))
        self.bucket_bytes.append(nbytes)
        self._prev, self._prev_bytes, self._bucket, self._deps = op, nbytes, 0, []
        self._issued.append(op)

    def step_end(self, cfg_layers: int, hidden: int, shard: int, world: int) -> None:
        """The reduction (unless it overlapped the backward), AdamW, the zero1 broadcasts."""
        E, s = self.element_size, self.sched
        norms = (2 * cfg_layers + 1) * hidden
        if self.overlapped:
            if self._bucket:
                self._launch()
            s.wait(*self._issued)
            if self._prev is not None:
                s.compute("ar.bucket.copy_back", self._copy_s(self._prev_bytes))
        else:
            if self.wdp > 1:
                s.comm("ar.grad_sync.weight_data", "weight_data", "all_reduce", shard * E,
                       self.comm_s("all_reduce", "weight_data", shard * E), True, True)
            if world > 1:
                s.comm("ar.grad_sync.world", "world", "all_reduce", norms * E,
                       self.comm_s("all_reduce", "world", norms * E), True, True)
        z = self.optim.zero1
        # AdamW runs on float32 (the masters of bfloat16 parameters, InternEvo's partitions too)
        s.compute("optimizer", Work.optimizer_s((shard + norms) // z, 4, self.rates))
        if self.optim.framework == "internevo":
            s.compute("optimizer.internevo_passes", INTERNEVO_STEP_BYTES * ((shard + norms) // z) / self.rates.optimizer_bytes)
        if z > 1:
            part = (shard + norms) * E // z
            for _ in range(z):
                s.comm("bcast.zero1", "zero1", "broadcast", part, self.comm_s("broadcast", "zero1", part), True, True)

    def expected(self, cfg_layers: int, hidden: int, shard: int, world: int) -> dict[str, dict[str, dict[str, int]]]:
        """What step_end and the buckets issue, from the sizes alone (the schedule is checked on it)."""
        E, out = self.element_size, {}
        norms = (2 * cfg_layers + 1) * hidden
        if self.overlapped:
            out["weight_data"] = {"all_reduce": {"calls": len(self.bucket_bytes), "bytes": (shard + norms) * E}}
        else:
            if self.wdp > 1:
                out["weight_data"] = {"all_reduce": {"calls": 1, "bytes": shard * E}}
            if world > 1:
                out["world"] = {"all_reduce": {"calls": 1, "bytes": norms * E}}
        z = self.optim.zero1
        if z > 1:
            out["zero1"] = {"broadcast": {"calls": z, "bytes": z * ((shard + norms) * E // z)}}
        return out

