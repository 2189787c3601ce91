"""A deterministic token stream that depends only on the data settings, never on the layout.

Step t's global batch is `global_batch` sequences of `seq_len + 1` tokens drawn from a
generator seeded by (seed, t); inputs are tokens[:-1], labels tokens[1:]. With `packed`
each sequence is cut into documents of random lengths (attention stays inside a document,
positions restart at 0 in each), and a micro-batch of several sequences is laid out as one
row, InternEvo's packed layout with `cu_seqlens`.

Sequence j of the global batch goes to micro-step j // (dp * micro_bsz) and data-parallel
rank (j // micro_bsz) % dp, so every layout trains on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DataSpec:
    seq_len: int
    global_batch: int
    micro_num: int
    packed: bool = True
    seed: int = 0
    vocab: int = 4096

    def micro_bsz(self, dp: int) -> int:
        """Sequences per micro-batch per data-parallel rank (InternEvo's data.micro_bsz)."""
        if self.global_batch % (dp * self.micro_num):
            raise ValueError(f"global_batch={self.global_batch} does not divide by "
                             f"dp={dp} x micro_num={self.micro_num}")
        return self.global_batch // (dp * self.micro_num)


@dataclass
class MicroBatch:
    """What one rank feeds the model for one micro-step."""

    tokens: torch.Tensor        # [rows, L/sp] this rank's slice of the sequence dim
    positions: torch.Tensor     # [rows, L/sp]
    labels: torch.Tensor        # [rows, L] every token of the row: the vocab-parallel loss needs all
    cu_seqlens: Optional[torch.Tensor]  # document boundaries over the full row (packed only)
    max_seqlen: Optional[int]


def global_batch(spec: DataSpec, step: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Tokens [global_batch, seq_len + 1] and, per sequence, its document lengths."""
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    tokens = torch.randint(0, spec.vocab, (spec.global_batch, spec.seq_len + 1), generator=gen)
    docs: list[list[int]] = []
    for _ in range(spec.global_batch):
        if not spec.packed:
            docs.append([spec.seq_len])
            continue
        lengths, left = [], spec.seq_len
        while left > 0:
            # Documents between 1/8 and 1/2 of the sequence, the last one takes the rest.
            n = int(torch.randint(max(1, spec.seq_len // 8), max(2, spec.seq_len // 2) + 1, (1,),
                                  generator=gen))
            lengths.append(min(n, left))
            left -= lengths[-1]
        docs.append(lengths)
    return tokens, docs


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


def micro_batches(spec: DataSpec, step: int, dp: int, dp_rank: int, sp: int, sp_rank: int) -> list[MicroBatch]:
    """The micro-batches rank (dp_rank, sp_rank) trains on at `step`."""
    tokens, docs = global_batch(spec, step)
    mbs = spec.micro_bsz(dp)
    out = []
    for micro in range(spec.micro_num):
        first = (micro * dp + dp_rank) * mbs
        rows = list(range(first, first + mbs))
        inputs, labels = tokens[rows, :-1], tokens[rows, 1:]
        if spec.packed:
            lengths = [n for r in rows for n in docs[r]]
            inputs, labels = inputs.reshape(1, -1), labels.reshape(1, -1)   # [1, mbs * seq_len]
            positions = _positions(lengths).unsqueeze(0)
            cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
            cu_seqlens, max_seqlen = cu, max(lengths)
        else:
            positions = torch.arange(spec.seq_len).expand(mbs, -1)
            cu_seqlens, max_seqlen = None, None
        row_len = inputs.shape[1]
        if row_len % sp:
            raise ValueError(f"row length {row_len} does not divide by sp={sp}")
        part = slice(sp_rank * row_len // sp, (sp_rank + 1) * row_len // sp)
        out.append(MicroBatch(inputs[:, part].contiguous(), positions[:, part].contiguous(),
                              labels.contiguous(), cu_seqlens, max_seqlen))
    return out
