"""A standalone implementation of InternEvo's ISP: weight-parallel linears with prefetch
overlap and a memory pool, Ulysses sequence-parallel attention, and a llama-class model.

InternEvo's public names are kept so its users recognise them.
"""

from isp_core.attention import DistributedAttention, LocalAttention, attention_packing, expand_kv_heads, local_attention
from isp_core.collectives import Pending, _SeqAllToAll, all_gather, all_reduce_, all_to_all, reduce_scatter
from isp_core.comm_stats import CommStats
from isp_core.data import DataSpec, MicroBatch, micro_batches
from isp_core.engine import ISPModel, ISPSettings, ISPTrainer, build_isp_model, build_reference_model
from isp_core.head_embedding import (EmbeddingWeightParallelCommunicator, GatheredHeadCommunicator,
                                     HeadWeightParallelCommunicator,
                                     ParallelEmbedding)
from isp_core.isp_communicator import ISPCommunicator, ISPOverlapState
from isp_core.isp_scheduler import ISPCommunicatorSchedulerHook, ISPCommunicatorWrapper
from isp_core.linear import ParallelLinearWithCommExt, WeightParallelLinear, WPCommunicator
from isp_core.loss import vocab_parallel_cross_entropy
from isp_core.memory_pool import ISPCommModelConfig, MemoryPool
from isp_core.model import LlamaConfig, LlamaModel
from isp_core.topology import CommGroup, ParallelTopology, as_comm_group, group_layout

__all__ = [
    "CommGroup", "CommStats", "GatheredHeadCommunicator", "LocalAttention", "as_comm_group", "attention_packing", "DataSpec", "DistributedAttention", "EmbeddingWeightParallelCommunicator",
    "HeadWeightParallelCommunicator", "ISPCommModelConfig", "ISPCommunicator", "ISPCommunicatorSchedulerHook", "ISPCommunicatorWrapper",
    "ISPModel", "ISPOverlapState", "ISPSettings", "ISPTrainer", "LlamaConfig", "LlamaModel", "MemoryPool",
    "MicroBatch", "ParallelEmbedding", "ParallelLinearWithCommExt", "ParallelTopology", "Pending",
    "WPCommunicator", "WeightParallelLinear", "_SeqAllToAll", "all_gather", "all_reduce_", "all_to_all",
    "build_isp_model", "build_reference_model", "expand_kv_heads", "group_layout", "local_attention",
    "micro_batches", "reduce_scatter", "vocab_parallel_cross_entropy",
]
