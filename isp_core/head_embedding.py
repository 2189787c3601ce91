"""Weight parallelism for the output head and the token embedding.

Head: weight [vocab, hidden] sharded on dim 0 over the weight group, gathered synchronously.
`head="vocab_parallel"` (InternEvo's HeadWeightParallelCommunicator): its logits [B, S/sp, V]
are turned into [B, S, V/sp] by an all-to-all over the sequence group (`retain_out_sharded`,
so the loss runs vocab-parallel), or gathered to [B, S, V]. `head="gathered"`
(GatheredHeadCommunicator): the head is just another weight-parallel linear, its logits
stay [B, S/sp, V], full vocabulary for this rank's own tokens, and the loss is an ordinary
cross-entropy over them: no logits all-to-all, no loss all-reduces.

Embedding: weight [vocab, hidden] sharded over the weight group on dim 0 (vocab-parallel)
or dim 1 (hidden-parallel), gathered along that dim in forward; its gradient is
reduce-scattered (AVG) along the same dim. By default the weight is gathered a second time
at the start of the embedding's backward, as InternEvo's EmbeddingWeightParallelCommunicator
does (its post-forward hook swaps `weight.data` back to the shard, and the backward of that
hook gathers the full table again before autograd computes the table's gradient), so the
traffic is InternEvo's. The gathered table is not read: the gradient of a lookup needs only
the token ids. `backward_gather=False` skips that transfer (`parallel.embedding_backward_gather:
false`), a saving of vocab x hidden x element size per micro-step that InternEvo could take.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from isp_core.collectives import Pending, all_gather, gather_along, reduce_scatter, seq_all_to_all
from isp_core.linear import WeightParallelLinear, WPCommunicator
from isp_core.topology import CommGroup, as_comm_group

SEQ_DIM, VOCAB_DIM = 1, 2
HEAD_MODES = ("vocab_parallel", "gathered")


class HeadWeightParallelCommunicator(WPCommunicator):
    vocab_parallel_loss = True  # the loss sees [B, S, V/sp] when retain_out_sharded

    def __init__(self, weight_process_group: Union[CommGroup, dist.ProcessGroup],
                 seq_process_group: Union[CommGroup, dist.ProcessGroup, None] = None,
                 retain_out_sharded: bool = True) -> None:
        self.weight_process_group = as_comm_group(weight_process_group, "weight")
        self.seq_process_group = as_comm_group(seq_process_group, "sequence")
        self.retain_out_sharded = retain_out_sharded

    def communication_mode(self) -> str:
        return "wp"

    def weight_hook(self, tensor: torch.Tensor, module: nn.Module, is_bias: bool = False) -> torch.Tensor:
        return all_gather(tensor, self.weight_process_group, label="head" + (".bias" if is_bias else "")).wait()

    def grad_hook(self, tensor: torch.Tensor, module: nn.Module,
                  is_bias: bool = False) -> tuple[torch.Tensor, Optional[Pending]]:
        label = "head" + (".bias" if is_bias else "")
        return reduce_scatter(tensor, self.weight_process_group, label=label).wait(), None

    def output_hook(self, output: torch.Tensor) -> torch.Tensor:
        """[B, S/sp, V] -> [B, S, V/sp] (or [B, S, V]); its backward is InternEvo's grad_output_hook."""
        if self.retain_out_sharded:
            return seq_all_to_all(self.seq_process_group, output, scatter_dim=VOCAB_DIM,
                                  gather_dim=SEQ_DIM, label="head.logits")
        return gather_along(output, self.seq_process_group, SEQ_DIM, label="head.logits")


class GatheredHeadCommunicator(HeadWeightParallelCommunicator):
    """The head as a plain weight-parallel linear: full-vocabulary logits [B, S/sp, V] for this
    rank's tokens, nothing sent over the sequence group."""

    vocab_parallel_loss = False

    def __init__(self, weight_process_group: Union[CommGroup, dist.ProcessGroup]) -> None:
        super().__init__(weight_process_group, None, retain_out_sharded=False)

    def output_hook(self, output: torch.Tensor) -> torch.Tensor:
        return output


class HeadLinear(WeightParallelLinear):
    """The output projection: a weight-parallel linear whose output goes through output_hook."""

    isp_block, isp_name = -1, "head"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.communicator.output_hook(super().forward(x))


class _EmbeddingFn(torch.autograd.Function):
    """forward: gather the full table along `dim`, look the tokens up.
    backward: gather the table again (InternEvo's, unless the communicator skips it), dense
    table gradient, reduce-scattered (AVG) back to this rank's shard.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, shard: torch.Tensor,
                comm: "EmbeddingWeightParallelCommunicator") -> torch.Tensor:
        full = all_gather(shard, comm.group, dim=comm.gather_dim, label="embedding").wait()
        ctx.save_for_backward(tokens)
        ctx.comm, ctx.full_shape = comm, full.shape
        ctx.shard_for_backward = shard.detach() if comm.backward_gather else None
        return F.embedding(tokens, full)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        comm = ctx.comm
        if comm.backward_gather:  # InternEvo's second gather; its result is not needed (see above)
            all_gather(ctx.shard_for_backward, comm.group, dim=comm.gather_dim, label="embedding.backward").wait()
        grad_full = grad_out.new_zeros(ctx.full_shape)
        grad_full.index_add_(0, tokens.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]))
        grad_shard = reduce_scatter(grad_full, comm.group, dim=comm.gather_dim, label="embedding").wait()
        return None, grad_shard, None


class EmbeddingWeightParallelCommunicator:
    """Gathers the embedding table for forward and reduce-scatters its gradient (AVG).

    Gradients of several micro-steps accumulate in the shard's `.grad` as autograd does for
    any parameter, so the optimizer sees the sum after the last micro-step.
    """

    def __init__(self, weight_process_group: Union[CommGroup, dist.ProcessGroup],
                 vocab_parallel: bool = True, backward_gather: bool = True) -> None:
        self.group = as_comm_group(weight_process_group, "weight")
        self.gather_dim = 0 if vocab_parallel else 1
        self.backward_gather = backward_gather  # InternEvo's second gather of the table in backward

    def register_module_hook(self, module: "ParallelEmbedding") -> None:
        module.communicator = self

    def lookup(self, tokens: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(tokens, shard)
        return _EmbeddingFn.apply(tokens, shard, self)


class ParallelEmbedding(nn.Module):
    """Embedding table sharded over the weight group (dim 0 if vocab_parallel, else dim 1)."""

    def __init__(self, vocab: int, hidden: int, wp_size: int, vocab_parallel: bool = True,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        super().__init__()
        dim_size = vocab if vocab_parallel else hidden
        if dim_size % wp_size:
            raise ValueError(f"embedding {'vocab' if vocab_parallel else 'hidden'}={dim_size} "
                             f"does not divide by wp={wp_size}")
        shape = (vocab // wp_size, hidden) if vocab_parallel else (vocab, hidden // wp_size)
        self.vocab, self.hidden, self.vocab_parallel = vocab, hidden, vocab_parallel
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.communicator: Optional[EmbeddingWeightParallelCommunicator] = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.communicator is not None, "ParallelEmbedding used before its communicator was registered"
        return self.communicator.lookup(tokens, self.weight)
