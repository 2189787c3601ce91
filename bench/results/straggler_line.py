"""The one line that says which rank was slowest, on which node and by how much: every report
that shows it (the printed table, summary.md, nightly.md) calls `slowest_rank_line`.

    rank 3 (node 1) +12.3% straggler        compute time of the slowest rank vs the median rank's,
    rank 0 (node 0) +1.2%                   "straggler" when past run.straggler_pct
    rank 5 (node 1) +9.8% straggler; node 1 +7.5% straggler     and each slow node, several nodes
"""

from __future__ import annotations

from typing import Any, Optional


def slowest_rank_line(metrics: Optional[dict[str, Any]]) -> Optional[str]:
    """The slowest rank of a record's metrics (metrics.straggler), or None when it has none."""
    found = (metrics or {}).get("straggler")
    if not isinstance(found, dict) or not isinstance(found.get("slowest"), dict):
        return None
    slowest = found["slowest"]
    flagged = {s.get("rank") for s in found.get("stragglers") or []}
    text = f"rank {slowest['rank']} (node {slowest['node']}) {slowest['lag_pct']:+.1f}%"
    if slowest["rank"] in flagged:
        text += " straggler"
    for node in found.get("node_stragglers") or []:
        text += f"; node {node['node']} {node['lag_pct']:+.1f}% straggler"
    return text
