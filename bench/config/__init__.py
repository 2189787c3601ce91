"""Stage 1, what to run: the cell schema, its checks, the YAML file with overrides, the matrix.

The names below are the config stage's public face; modules inside bench import from the
submodules directly (schema, checks, cell, file, matrix).
"""

from bench.config.cell import CellConfig
from bench.config.schema import (COLLECTIVE_OPS, SECTIONS, STRATEGIES, CollectivesConfig, ConfigError, DataConfig,
                                 ModelConfig, NvmlConfig, ParallelConfig, Problem, ProfileConfig, RunConfig, all_keys)

__all__ = ["COLLECTIVE_OPS", "SECTIONS", "STRATEGIES", "CellConfig", "CollectivesConfig", "ConfigError", "DataConfig",
           "ModelConfig", "NvmlConfig", "ParallelConfig", "Problem", "ProfileConfig", "RunConfig", "all_keys"]
