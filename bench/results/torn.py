"""A torn tail: the last line of results.jsonl without its newline, which does not parse.

Records are written as one synced write of one line (records.append_record), so a crash in
the middle of that write can only cut the last line. Readers leave it out with a warning;
`--resume` sets its bytes aside in a side file and cuts the file back (docs/runs.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass(frozen=True)
class TornTail:
    """A last line without its newline that is not a record: a write cut short by a crash."""

    path: Path
    line: int  # its line number
    offset: int  # the byte where it starts; the complete records end here
    data: bytes

    @property
    def cell(self) -> str | None:
        """The cell the torn record was for, when the cut left its id readable."""
        match = re.search(rb'"cell": *"([^"\\]+)"', self.data)
        return match.group(1).decode(errors="replace") if match else None


def torn_tail(path: Path, data: bytes | None = None) -> TornTail | None:
    """The torn tail of a results file, or None. A last line that parses (only its newline lost)
    is a complete record, not a torn one."""
    data = path.read_bytes() if data is None else data
    if not data or data.endswith(b"\n"):
        return None
    start = data.rfind(b"\n") + 1
    last = data[start:]
    try:
        if isinstance(json.loads(last), dict) or not last.strip():
            return None
    except ValueError:
        pass
    return TornTail(path, data.count(b"\n") + 1, start, last)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    # The summary, the roofline and resume read one file several times: say it once.
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr, flush=True)


def warn_torn(torn: TornTail) -> None:
    warn_once(f"{torn.path}:{torn.line}: warning: torn tail ({len(torn.data)} bytes without a newline, "
               f"a write cut short); using the complete records before it "
               f"(run_bench.py --resume moves it aside and runs its cell again)")


def set_torn_tail_aside(path: Path) -> tuple[TornTail, Path] | None:
    """Move a torn tail's bytes to results.jsonl.torn-<UTC> beside it (synced first), then cut
    the file back to its complete records. Nothing is deleted."""
    torn = torn_tail(path) if path.exists() else None
    if torn is None:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    side = path.with_name(f"{path.name}.torn-{stamp}")
    with open(side, "ab") as f:
        f.write(torn.data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        f.truncate(torn.offset)
        f.flush()
        os.fsync(f.fileno())
    return torn, side
