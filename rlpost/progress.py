"""Progress bars: one per stage (sft, preference/<loss>, reward_model, rl/<algorithm>, eval, preference
pairs), each with its total so tqdm shows the rate and the time left.

    for step in progress(range(start, steps), total=steps, initial=start, desc="sft"):
        ...
        tqdm.write(line)        # console lines go through tqdm.write, above the bar, never through it

Bars go to stderr; TQDM_DISABLE=1 (tqdm's own variable, read here when a bar starts, not once when tqdm
is imported) turns them all off. Under torchrun only rank 0 shows them.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

from rlpost import distributed as dist


def progress(iterable=None, *, total: int, desc: str, initial: int = 0, unit: str = "step",
             leave: bool = True) -> tqdm:
    """A tqdm bar on stderr over `iterable` (or updated by hand), `total` known so it shows an ETA."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                file=sys.stderr, disable=disabled())


def disabled() -> bool:
    """No bars: a rank other than 0, or TQDM_DISABLE set (to anything but 0 / false / no)."""
    return not dist.is_main() or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
