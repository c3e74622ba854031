"""Progress bars: one per stage (sft, preference/<loss>, reward_model, rl/<algorithm>, eval, preference
pairs), each with its total so tqdm shows the rate and the time left.

    for step in progress(range(start, steps), total=steps, initial=start, desc="sft"):
        ...
        tqdm.write(line)        # console lines go through tqdm.write, above the bar, never through it

Bars go to stderr; TQDM_DISABLE=1 (tqdm's own variable) turns them all off. Under torchrun only rank 0
shows them.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from rlpost import distributed as dist


def progress(iterable=None, *, total: int, desc: str, initial: int = 0, unit: str = "step",
             leave: bool = True) -> tqdm:
    """A tqdm bar on stderr over `iterable` (or updated by hand), `total` known so it shows an ETA."""
    kwargs = {} if dist.is_main() else {"disable": True}  # on rank 0, TQDM_DISABLE decides (tqdm reads it)
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                file=sys.stderr, **kwargs)
