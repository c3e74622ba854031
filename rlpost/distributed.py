"""The process group of a sharded run (`trainer.strategy=fsdp2`), and the few collectives rlpost uses.

    torchrun --nproc_per_node 2 -m rlpost.cli train trainer.strategy=fsdp2 rl.weight_sync=copy

`init()` joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): backend gloo on the CPU, nccl when CUDA is present (each rank then uses GPU
LOCAL_RANK). Without torchrun (WORLD_SIZE unset) it makes a 1-rank group in this process, so a sharded
run also works, as one shard, in a plain `python` process. Only the CPU/gloo path is tested here; the
CUDA/nccl path follows torch's documented recipe and is untested.

Every helper works without a process group too (one process: rank 0 of 1, reductions are the identity),
so the roles call them unconditionally.

    rank(), world_size(), is_main()              who am I
    barrier()                                    wait for every rank
    reduce_sum(x) / reduce_min(x) / reduce_max(x)    a float over ranks
    reduce_dict(d, op)                           a dict of floats (same keys on every rank), one all-reduce
    reduce_metrics(d)                            a step's metrics dicts combined over ranks (keys may differ)
    broadcast_object(obj)                        rank 0's picklable object on every rank
    gather_objects(obj)                          every rank's picklable object, as a list, on every rank
    whiten_over_ranks(x, mask, eps)              whitening over every rank's masked entries
    shard_model(model)                           FSDP2 over each transformer block and the root (the policy,
                                                 a LoRA one too; the frozen reference, forward-only; a meta
                                                 skeleton too)
    shard_module(module)                         FSDP2 over what a module holds besides its sharded parts (a head)
    share(n)                                     this rank's contiguous slice of n rows (or examples)
    full_state_dict(model)                       the gathered, unsharded weights of a (sharded) model
    load_full_state_dict(model, state)           full weights into a (sharded) model, each rank its shard
    plain_copy(model)                            a plain, unsharded copy of a (sharded) model on every rank
    sharded_copy(model)                          a second sharded module with a sharded model's weights, each
                                                 rank copying its own shards (nothing gathered)
    save_shards(folder, model, optimizer, critic)    each rank writes its own shards (torch.distributed.checkpoint)
    load_shards(folder, model, optimizer, critic)    read them back, resharded to this run's ranks
    destroy()                                    leave the process group: a barrier, then destroy it, then
                                                 wait for gloo's worker threads to go idle (init() leaves
                                                 it at exit too when a program never gets to destroy())
"""

from __future__ import annotations

import atexit
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from rlpost.models import is_sharded, model_device, rebuild, skeleton_of, transformer_blocks
from rlpost.models.lora import initial_adapters

# the model methods besides forward that run the trunk (value heads, reward models, shared-prompt scoring):
# FSDP2 gathers a sharded root's parameters around them too
FORWARD_METHODS = ("hidden_states", "forward_shared_prompt")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init() -> None:
    """Join torchrun's process group (or make a 1-rank one without torchrun). Idempotent. The group is left at
    interpreter exit (`destroy` without the barrier) when the program did not get to `destroy` itself."""
    if initialized():
        return
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:  # untested here: each rank on its own GPU, so `model.device=cuda` resolves to it
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)  # env:// from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    global _exit_hook
    if not _exit_hook:  # atexit runs while the interpreter is whole: before finalization starts
        atexit.register(_leave_at_exit)
        _exit_hook = True


_exit_hook = False
GLOO_WORKER = "pt_gloo_runloop"  # the thread name of ProcessGroupGloo's workers (Linux: /proc/self/task/*/comm)


def destroy() -> None:
    """Leave the process group (at the end of a run), if there is one: a barrier, so that no rank tears its
    group down while another still talks to it, then destroy_process_group, then wait until gloo's worker
    threads are idle. While an exception propagates there is no barrier (the other ranks may be anywhere;
    torchrun stops them when this one exits non-zero); the group is destroyed all the same.

    Why the wait: destroying the group does not end gloo's threads while anything still holds the group (an
    FSDP2 model's device mesh, torch's caches: they live until the interpreter exits), and a worker that
    finishes a collective drops its tensors after the caller's wait() has returned. A tensor whose Python
    object Python already let go needs the GIL to be freed; if that happens while the interpreter finalizes,
    the thread is ended inside C++ and the process aborts ("terminate called without an active exception",
    SIGABRT) after all its work is done."""
    if not initialized():
        return
    try:
        if sys.exc_info()[0] is None:
            barrier()
    finally:
        _leave()


def _leave() -> None:
    dist.destroy_process_group()
    wait_for_idle_gloo_workers()


def _leave_at_exit() -> None:
    """atexit: a group the program did not destroy (an exception ended it) is left, without a barrier."""
    if initialized():
        _leave()


def _busy_gloo_workers() -> int:
    """How many of this process's gloo worker threads are runnable (state R: working, or about to);
    0 where /proc/self/task cannot be read."""
    busy = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != GLOO_WORKER:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]  # after "pid (comm)"
        except (OSError, IndexError):
            continue  # the thread ended
        busy += state == "R"
    return busy


def wait_for_idle_gloo_workers(quiet_s: float = 0.02, limit_s: float = 10.0) -> bool:
    """Sleep (the GIL released: a worker that needs it gets it) until no gloo worker thread has been runnable
    for `quiet_s`: each has dropped its last collective's tensors and waits for work that will not come.
    False when they were still busy after `limit_s` (then teardown goes on regardless)."""
    start = quiet = time.monotonic()
    while True:
        now = time.monotonic()
        if _busy_gloo_workers():
            quiet = now
        elif now - quiet >= quiet_s:
            return True
        if now - start > limit_s:
            return False
        time.sleep(0.002)


def launched_by_torchrun() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory, the metrics, the console and the checkpoints."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def reduce_dict(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Each value reduced over ranks (`op`: sum | max | min) in one all-reduce. Every rank must pass
    the same keys."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=_OPS[op])
    return dict(zip(keys, t.tolist()))


def reduce_sum(x: float) -> float:
    return reduce_dict({"x": x}, "sum")["x"]


def reduce_max(x: float) -> float:
    return reduce_dict({"x": x}, "max")["x"]


def reduce_min(x: float) -> float:
    return reduce_dict({"x": x}, "min")["x"]


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """rlpost.ops.masked_whiten with the mean and (population) std over the masked entries of every
    rank's rows: a sharded run's advantages whitened as one process whitens the whole batch. Every rank calls it."""
    m = mask.bool()
    xd = x.detach().double()
    sums = _sum_over_ranks(torch.stack([torch.where(m, xd, 0.0).sum(), m.sum().double()]))
    n = sums[1].clamp(min=1)
    mean = sums[0] / n
    var = _sum_over_ranks(torch.where(m, (xd - mean) ** 2, 0.0).sum().reshape(1))[0] / n
    scale = var.sqrt() + eps
    return torch.where(m & (scale > 0), ((x - mean) / scale).to(x.dtype), torch.zeros_like(x))


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over ranks (all-reduce), on its own device."""
    if world_size() == 1:
        return t
    out = t.to(_device())
    dist.all_reduce(out)
    return out.to(t.device)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


COUNTED = ("reward/errors", "reward/timeouts", "env/errors", "env/timeouts")
"""metrics that count a rank's samples (failed rewards and episodes; env/errors_<source> too): summed over ranks"""


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One RL step's metrics combined over ranks, each key over the ranks that logged it: the maximum for
    `time/*` and keys with `max` in their name (the slowest rank sets the step's pace), and for the memory
    peaks `mem/*` (the fullest rank is the one that runs out of memory first), the sum for
    throughputs (`*tokens_per_s`) and for the counts of failed samples (COUNTED), the mean for everything else
    (each rank holds an equal share of the prompts, so the mean of the ranks' means is the step's mean). Keys
    may differ between ranks."""
    if world_size() == 1:
        return metrics
    gathered: list[dict] = [None] * world_size()
    dist.all_gather_object(gathered, metrics)
    out = {}
    for key in dict.fromkeys(k for m in gathered for k in m):
        values = [float(m[key]) for m in gathered if key in m and m[key] is not None]
        if not values:
            continue
        if key.startswith(("time/", "mem/")) or "max" in key:
            out[key] = max(values)
        elif key.endswith("tokens_per_s") or key in COUNTED or key.startswith(("env/errors_", "env/timeouts_")):
            out[key] = sum(values)
        else:
            out[key] = sum(values) / len(values)
    return out


# ---------------------------------------------------------------------------- FSDP2

def shard_model(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """FSDP2 in place: `fully_shard` each transformer block, then the root (embeddings, final norm, head).
    Rank 0's weights are broadcast first, so every rank shards the same model (a LoRA model: its frozen base and
    trainable adapters in the same groups, FSDP2 reduces the adapters' gradients alone; rank 0's initial
    adapters too, which rlpost.models.lora.reset_adapters puts back). Gradients are SUMMED over
    ranks, not averaged (divide factor 1): rlpost's losses are already normalised by the global token and
    sequence counts (Batch.global_tokens / global_seqs), so each rank's loss is its share of the global one.
    A model sharded already (by an earlier stage of the run) is returned as it is.
    A skeleton (parameters on the meta device: rlpost.models.load_model(skeleton=True)) is sharded as it is and
    each rank then allocates only its shards, on `device`, uninitialised: the caller fills them (load_shards)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(model):
        return model
    init()
    skeleton = any(p.is_meta for p in model.parameters())
    if not skeleton:
        _broadcast_weights(model)
        _broadcast_tensors(initial_adapters(model).values())  # LoRA: what a reset puts back, the same on every rank
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    if skeleton:  # this rank's shards only (to_empty's allocation, the real buffers left as they are)
        model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    _sum_gradients(model)
    return model


def shard_module(module: nn.Module, methods: tuple[str, ...] = ()) -> nn.Module:
    """FSDP2 in place over the parameters of `module` that no FSDP2 module under it holds yet (a value head,
    a reward model's head around its sharded trunk), as one group, gradients summed like shard_model's;
    `methods`: those besides forward that gather them too. Rank 0's weights are broadcast first. Idempotent."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(module):
        return module
    init()
    _broadcast_weights(module)
    fully_shard(module)
    for name in methods:
        register_fsdp_forward_method(module, name)
    _sum_gradients(module)
    return module


def _broadcast_weights(model: nn.Module) -> None:
    _broadcast_tensors(t for t in model.state_dict().values()
                       if not isinstance(t, DTensor))  # (a shard of a part sharded already)


def _broadcast_tensors(tensors) -> None:
    """Rank 0's values of `tensors` (plain, the same shapes on every rank) into every rank's, in place."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


def _sum_gradients(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def share(n: int) -> range:
    """This rank's part of `n` rows (or examples): contiguous, in rank order, sizes differing by at most one
    (the first n % world ranks take one more), so that the ranks' parts put together are 0..n-1 in order.
    A rank gets none when n < world_size()."""
    world, r = world_size(), rank()
    size, extra = divmod(n, world)
    start = r * size + min(r, extra)
    return range(start, start + size + (r < extra))


def full_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state_dict under its own module names, on every rank (an all-gather), or
    only on rank 0 with `rank0_only` (others get {}), offloaded to the CPU. A collective when the model is
    sharded: every rank must call it. An unsharded model's own state_dict otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))


def unsharded(model: nn.Module) -> nn.Module | None:
    """A plain module with the model's full weights, for saving: the model itself when it is not sharded;
    when it is, a CPU copy rebuilt on rank 0 from the gathered weights (None on the other ranks). A
    collective when sharded: every rank must call it."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model, rank0_only=True)
    return rebuild(model, state) if is_main() else None


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put full (unsharded) weights `state` into `model`: each rank keeps its shard when the model is sharded
    (every rank passes the same full state), a plain load_state_dict otherwise."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def sharded_copy(model: nn.Module, dtype: torch.dtype | None = None, requires_grad: bool = False) -> nn.Module:
    """A second sharded module with a sharded model's weights, without gathering them: a skeleton of its
    architecture (rlpost.models.skeleton_of: parameters on the meta device, the model's buffers) sharded as the
    model is (shard_model: the same blocks on the same ranks, so the same rows on each rank), each rank then
    copying its own shards into the copy's. No rank ever holds more than its shards of either. What a frozen
    reference and a separate critic's trunk are made from under fsdp2. `dtype`: the copy's parameters'
    (default: the model's; buffers keep the model's); `requires_grad`: whether they train. Every rank calls it
    (the copy's FSDP2 groups pair up across ranks). Only for a sharded model without LoRA (plain_copy)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # a root keeps its parameters gathered after a forward (for a backward): shards again
        if isinstance(m, FSDPModule):
            m.reshard()
    copy = skeleton_of(model)
    if dtype is not None:
        for p in copy.parameters():
            p.data = p.data.to(dtype)
    copy.requires_grad_(requires_grad)
    shard_model(copy, model_device(model))
    theirs = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in copy.named_parameters():
            mine, source = p.to_local(), theirs[name]
            source = source.to_local() if isinstance(source, DTensor) else source
            if mine.shape != source.shape:
                raise RuntimeError(f"sharded_copy: {name} is sharded differently in the copy ({tuple(mine.shape)}) "
                                   f"and the model ({tuple(source.shape)}) on rank {rank()}")
            mine.copy_(source)
    return copy


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded) module with a sharded model's full weights, on every rank and on the model's device:
    what a frozen copy of a sharded policy is made from (the RL reference, a separate critic's trunk, a reward
    model's trunk). A collective: every rank must call it. Only for a sharded model."""
    return rebuild(model, full_state_dict(model)).to(model_device(model))


# ---------------------------------------------------------------------------- sharded checkpoints (DCP)

def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  critic: nn.Module | None = None) -> dict:
    """{"model": ..., "optimizer": ...}: the state_dicts of a sharded model (and its optimizer) as DTensors,
    keyed by parameter name, without gathering anything: what `save_shards` writes and `load_shards` fills.
    `critic`: a second sharded module the same optimizer trains (PPO's critic): its weights come under
    "critic", and the optimizer's state is keyed `policy.<name>` / `critic.<name>`, as the Trainer keys it.
    A plain (unsharded) model gives its full tensors under the same names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if critic is not None:
        state["critic"] = get_model_state_dict(critic)
    if optimizer is not None:
        owner = model if critic is None else optimizer_owner(model, critic)
        state["optimizer"] = get_optimizer_state_dict(owner, optimizer)
    return state


def optimizer_owner(model: nn.Module, critic: nn.Module | None) -> nn.Module:
    """The module whose parameter names key an optimizer over the policy and, when given, a critic: the policy
    itself, or both under `policy.` and `critic.` (the same names in a full and in a sharded state)."""
    return model if critic is None else nn.ModuleDict({"policy": model, "critic": critic})


def save_shards(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                critic: nn.Module | None = None) -> None:
    """Write the model's (and optimizer's, and a `critic`'s: see `sharded_state`) state into `folder` with
    torch.distributed.checkpoint: every rank writes the shards it holds (`__<rank>_0.distcp`), rank 0 the
    `.metadata` that maps them, so no rank ever holds more than its own shards plus the buffer of the tensor
    being written. A collective: every rank calls it with the same folder (rank 0 makes it)."""
    import torch.distributed.checkpoint as dcp

    if is_main():
        os.makedirs(folder, exist_ok=True)
    barrier()
    dcp.save(sharded_state(model, optimizer, critic), checkpoint_id=folder)


def load_shards(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                weights: bool = True, critic: nn.Module | None = None) -> None:
    """Read `save_shards`' folder into the model (`weights`), the optimizer (when given) and the `critic` (when
    given: its weights, and the optimizer's state of its parameters), in place, under any number of ranks,
    sharded or not: each rank reads the parts of the saved shards that its own shards (or, unsharded, its full
    tensors) cover. A collective when there is a process group: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(model, optimizer, critic)
    if not weights:
        del state["model"]
    dcp.load(state, checkpoint_id=folder)
    if weights:
        set_model_state_dict(model, state["model"])
    if critic is not None:
        set_model_state_dict(critic, state["critic"])
    if optimizer is not None:
        set_optimizer_state_dict(optimizer_owner(model, critic), optimizer, state["optimizer"])
