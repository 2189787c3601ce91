"""torchrun for one cell's job: `python -m bench.sweep.torchrun ARGS` is `torchrun ARGS`, and its
process then leaves at once instead of through the interpreter's finalisation.

An interpreter that has imported torch takes about a second to shut down on a busy 2-core
machine (module teardown, garbage collection of torch's objects); once torchrun has reported
its workers' end, nothing of that shutdown matters to the cell, but the runner would wait for
it before the next cell. Output, the exit code (0, or 1 with the same traceback and "Root
Cause" report on a failure) and signal handling are torchrun's own.
"""

from __future__ import annotations

import sys
import traceback

from bench.worker.finish import leave


def main(argv: list[str]) -> int:
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, exit code 1 as it gives
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
