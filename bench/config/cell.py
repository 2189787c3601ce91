"""One fully resolved benchmark cell: the seven sections, checked as a whole when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.config.checks import cell_problems
from bench.config.schema import (SECTIONS, CollectivesConfig, ConfigError, DataConfig, ModelConfig, NvmlConfig,
                                 ParallelConfig, Problem, ProfileConfig, RunConfig, _show, field_problems, suggest)


@dataclass(frozen=True)
class CellConfig:
    """One fully resolved benchmark cell, the unit the worker runs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    nvml: NvmlConfig = field(default_factory=NvmlConfig)
    collectives: CollectivesConfig = field(default_factory=CollectivesConfig)

    def __post_init__(self) -> None:
        problems = cell_problems(self)
        if problems:
            raise ConfigError([f"{p.key}: {p.text}" for p in problems], problems)

    @property
    def dp(self) -> int:
        return self.parallel.world_size // self.parallel.sp

    @property
    def micro_bsz(self) -> int:
        """Samples per micro-batch per dp rank (InternEvo data.micro_bsz)."""
        return self.data.global_batch // (self.dp * self.data.micro_num)

    @property
    def tokens_per_step(self) -> int:
        return self.data.global_batch * self.data.seq_len

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellConfig:
        """Build from a nested dict; missing keys take defaults, unknown ones raise ConfigError."""
        problems = [Problem(k, suggest(k, list(SECTIONS))) for k in d if k not in SECTIONS]
        for name, values in d.items():
            if name in SECTIONS and not isinstance(values, dict):
                problems.append(Problem(name, f"expected a mapping, got {_show(values)}"))
            elif name in SECTIONS:
                problems += [Problem(f"{name}.{p.key}", p.text) for p in field_problems(SECTIONS[name], values)]
        if problems:
            raise ConfigError([f"{p.key}: {p.text}" for p in problems])
        return cls(**{name: SECTIONS[name](**d.get(name, {})) for name in SECTIONS})
