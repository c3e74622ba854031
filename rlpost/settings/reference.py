"""reference.*: where the RL stage keeps the frozen reference policy (rlpost/reference.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import Section, opt


@dataclass
class ReferenceConfig(Section):
    offload: bool = opt(False, "keep the reference's frozen copy in CPU memory and stream it to the GPU one "
                               "transformer block at a time for its forward (the GPU holds its embeddings, head and "
                               "one block instead of the whole copy; one host-to-device copy of the weights per "
                               "step). Needs a GPU: refused under model.device=cpu, nothing to offload to",
                        layout=True)
