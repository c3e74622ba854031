"""CRITIC (PPO only): a value function V(prefix) on top of a language model's hidden states.

    critic = Critic.build(policy, "head", cfg)      # a value head on the policy's own trunk (shared weights)
    critic = Critic.build(policy, "separate", cfg)  # a frozen-at-start copy of the trunk + head, trained apart
    values = critic(batch)                          # [B, T]: values[b, t] = V(input_ids[b, :t]), 0 off the response

`cfg` is the `trainer.*` section (rlpost.config.TrainerConfig; None: its defaults).

values[b, t] is the expected return before token t is emitted: it is read from the hidden state at t-1,
the same alignment as token log-probs. The head starts at zero, so first values are 0.

It computes on its parameters' device and returns values on the batch's device. Called on a whole batch (the
value pass before the advantages) it runs in the trainer's micro-batches, packed or not (`micro_batch_size`,
`micro_batch_tokens`, `packing` of the `trainer.*` section it is built with), so that pass never holds more
than one micro-batch's activations; the trainer passes each of its own micro-batches (`split=False`) with their
packing. With precision="bf16" the trunk runs under bf16 autocast and the head in fp32. Its weights are an nn.Module's
state_dict: the head, plus the trunk for a separate critic (a shared trunk is the policy's, saved with the policy).

Sharded (trainer.strategy=fsdp2, `shard()`, which the Trainer calls): a separate critic's trunk is sharded like
the policy (made from a sharded policy shard by shard, rlpost.distributed.sharded_copy, so nothing is gathered;
a LoRA policy's from its gathered weights) and the head is one more FSDP2 group; a shared-trunk critic shards
its head (the trunk is the sharded policy). Every rank then runs the same number of forward passes in a
whole-batch value pass (rlpost.packing.even_forwards: a packed micro-batch is one forward, and a rank with fewer
micro-batches repeats its first and drops the result), and the trunk runs without shared-prompt scoring. Its
`full_state_dict()` is the gathered one (rank 0), `load_full_state_dict` puts one back on every rank.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlpost import distributed as dist
from rlpost.batch import Batch
from rlpost.config import TrainerConfig
from rlpost.models import HFCausalLM, autocast, check_precision, model_device, resolve_packing, trunk_hidden_states
from rlpost.models.gpt_mini import GPT
from rlpost.models.lora import is_lora
from rlpost.packing import Packed, even_forwards, micro_batches, scatter_rows
from rlpost.settings.critic import CRITIC_TYPES  # the valid critic.type names, declared with the key


class Critic(nn.Module):
    def __init__(self, trunk: nn.Module, hidden_size: int, shared: bool, cfg: TrainerConfig | None = None,
                 probe: nn.Module | None = None):
        """`cfg`: the `trainer.*` section, whose precision and micro-batching (micro_batch_size,
        micro_batch_tokens, packing) a whole-batch value pass runs with (None: the defaults). `probe`: the model
        whose forward tells whether the trunk can pack rows (default: the trunk itself), the policy a sharded
        trunk was copied from: running the trunk would make it an FSDP2 root before the critic shards over it."""
        super().__init__()
        cfg = cfg or TrainerConfig()
        check_precision(cfg.precision, model_device(trunk))
        # true fails now on a trunk that cannot pack; auto is off there
        packing = resolve_packing(cfg.packing, trunk if probe is None else probe)
        self.shared, self.precision = shared, cfg.precision
        self.micro_batch_size, self.micro_batch_tokens = cfg.micro_batch_size, cfg.micro_batch_tokens
        self.packing = packing
        # A shared trunk is the policy itself: keep it out of this module's parameters so the optimizer
        # and checkpoints see it once (through the policy).
        self._trunk = [trunk] if shared else None
        self.trunk = None if shared else trunk
        self.head = nn.Linear(hidden_size, 1, device=model_device(trunk))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.sharded = False

    @classmethod
    def build(cls, policy: nn.Module, kind: str = "separate", cfg: TrainerConfig | None = None) -> "Critic":
        """A critic of `kind` for `policy`, computing as `cfg` (the `trainer.*` section) says."""
        if kind not in CRITIC_TYPES:
            raise ValueError(f"critic.type must be one of {', '.join(CRITIC_TYPES)}, got {kind!r}")
        probe = None
        if kind == "head":
            trunk = policy
        elif dist.is_sharded(policy) and not is_lora(policy):
            # a sharded policy (a fsdp2 run): each rank copies its own shards into a trunk sharded alike, so
            # nothing is gathered (rlpost.distributed.sharded_copy); the policy, the same model, is probed
            trunk, probe = dist.sharded_copy(policy, requires_grad=True), policy
        else:  # a sharded LoRA policy: a plain copy of its full weights (its adapters are no skeleton's)
            trunk = dist.plain_copy(policy) if dist.is_sharded(policy) else copy.deepcopy(policy)
            trunk.requires_grad_(True)
        if kind != "head" and cfg is not None and cfg.strategy == "fsdp2":
            _freeze_unread_head(trunk)  # (one process keeps it in its optimizer, as its checkpoints have it)
        return cls(trunk, policy.hidden_size, shared=kind == "head", cfg=cfg, probe=probe)

    def shard(self) -> None:
        """FSDP2 over the critic (rlpost.distributed): a separate trunk like a policy, then the head. Idempotent."""
        if self.trunk is not None:
            dist.shard_model(self.trunk)
        dist.shard_module(self)
        self.sharded = True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict(), gathered when sharded (a collective: every rank calls it; rank 0 gets it, the others {})."""
        return dist.full_state_dict(self, rank0_only=True) if self.sharded else self.state_dict()

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put back a `full_state_dict()` (sharded: every rank passes the same one and keeps its shard)."""
        dist.load_full_state_dict(self, state)

    def forward(self, batch: Batch, packed: Packed | None = None, split: bool = True) -> torch.Tensor:
        """values [B, T] of `batch`, run in this critic's micro-batches (a whole-batch value pass); `split=False`:
        `batch` is one micro-batch (the trainer's), run as it is, packed with `packed` (its rows' packing) or
        padded. Sharded, a micro-batch is one forward whichever it is, so the trainer's ranks may differ."""
        out = batch.input_ids.device
        batch = batch.to(self.head.weight.device)
        if split and packed is None and (self.packing or self.micro_batch_size or self.micro_batch_tokens):
            trunk = self._trunk[0] if self.shared else self.trunk
            share = not self.sharded and getattr(trunk, "can_share_prompt", False)  # as trunk_hidden_states will
            plan = micro_batches(batch, self.micro_batch_size, self.micro_batch_tokens, self.packing,
                                 share) if len(batch) else []
            parts = []  # sharded: as many forwards as the rank with the most (the same collectives), extras dropped
            for rows, mb, p, real in even_forwards(batch, plan, dist.reduce_max if self.sharded else None):
                values = self._values(mb, p)
                if real:
                    parts.append((rows, values))
            if not parts:
                return torch.zeros(batch.input_ids.shape, device=out)
            return scatter_rows(parts, len(batch)).to(out)
        return self._values(batch, packed).to(out)

    def _values(self, batch: Batch, packed: Packed | None) -> torch.Tensor:
        trunk = self._trunk[0] if self.shared else self.trunk
        with autocast(batch.input_ids.device, self.precision):
            h = trunk_hidden_states(trunk, batch, share_prompt=not self.sharded,  # each distinct prompt once (padded)
                                    packed=packed)
        v = self.head(h.float()).squeeze(-1)                         # value after reading token t, fp32
        v = F.pad(v[:, :-1], (1, 0))                                 # value before emitting token t
        return (packed.unpack(v) if packed is not None else v) * batch.response_mask


def _freeze_unread_head(trunk: nn.Module) -> None:
    """Freeze a separate trunk's LM head when it is not the input embedding (untied), under fsdp2: the critic
    reads the trunk's final hidden states, never its logits, so that head gets no gradient and AdamW no state for
    it. As a trainable parameter it broke a fsdp2 resume: DCP gives every trainable parameter of the new optimizer
    a state before loading, and looked for one the checkpoint never had. Frozen, it is out of the optimizer from
    the start (training is unchanged: AdamW skipped it). A tied head is the embedding, which the critic reads.
    One process leaves it trainable: its optimizer state loads by position, and its checkpoints count it."""
    if isinstance(trunk, GPT):
        head, embedding = trunk.lm_head, trunk.transformer.wte
    elif isinstance(trunk, HFCausalLM):
        head, embedding = trunk.hf.get_output_embeddings(), trunk.hf.get_input_embeddings()
    else:
        return
    if head is not None and head.weight is not embedding.weight:
        head.requires_grad_(False)  # (a LoRA-wrapped head's adapters too)
