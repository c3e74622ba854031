"""Per-role memory peaks (rlpost/devices.py) as the controller logs them: reset per role on the CPU (peak RSS
through /proc/self/clear_refs) and on CUDA (max_memory_allocated), the so-far fallback named as such, and
on CUDA gpu/util and NVTX ranges. The CUDA test is marked `cuda` and skips without a GPU."""

import pytest
import torch

from rlpost import devices
from rlpost.devices import RoleProbe

MB = 2 ** 20


def fill(mib: int) -> bytearray:
    """A buffer that is really resident: every page written."""
    buf = bytearray(mib * MB)
    buf[::4096] = b"\x01" * len(buf[::4096])
    return buf


@pytest.mark.skipif(not devices.reset_rss_peak(), reason="this kernel cannot reset the peak RSS (clear_refs)")
def test_the_cpu_peak_is_reset_per_role_so_a_small_role_after_a_large_one_reads_small():
    probe = RoleProbe("cpu")
    assert probe.resettable and probe.prefix == "mem/peak_"
    with probe.role("big"):
        buf = fill(200)
        del buf
    with probe.role("small"):
        pass
    with probe.role("big"):  # entered twice in a step: the larger peak stays
        pass
    m = probe.metrics()
    assert set(m) == {"mem/peak_big", "mem/peak_small"}
    assert m["mem/peak_big"] >= m["mem/peak_small"] + 150, m  # the 200 MiB showed in its own role only
    assert m["mem/peak_small"] > 10                             # the interpreter and torch are resident
    probe.clear()
    assert probe.metrics() == {}


def test_without_a_resettable_peak_the_metric_is_named_peak_so_far(monkeypatch):
    monkeypatch.setattr(devices, "reset_rss_peak", lambda: False)
    probe = RoleProbe("cpu")
    with probe.role("train"):
        pass
    m = probe.metrics()
    assert list(m) == ["mem/peak_so_far_train"]
    assert m["mem/peak_so_far_train"] == pytest.approx(devices.lifetime_rss_peak_mib(), rel=0.05)


def test_a_role_that_raises_still_closes_and_keeps_its_peak():
    probe = RoleProbe("cpu")
    with pytest.raises(ValueError):
        with probe.role("reward"):
            raise ValueError("boom")
    assert probe.metrics()[f"{probe.prefix}reward"] > 0


@pytest.mark.cuda
def test_cuda_peaks_per_role_gpu_util_and_a_controller_step(tiny_gpt):
    """On CUDA: a 256 MiB tensor shows in its role's peak only; gpu/util is logged when pynvml is installed;
    the NVTX ranges open and close; a whole controller step on the GPU logs mem/peak_<role> per role."""
    from rlpost import get_algorithm
    from rlpost.config import RLConfig, RolloutConfig, TrainerConfig
    from rlpost.controller import Controller, Roles
    from rlpost.reference import Reference
    from rlpost.env.reward import Reward
    from rlpost.rollout import SamplingParams
    from rlpost.rollout.native import NativeEngine
    from rlpost.trainer import Trainer
    from rlpost.weight_sync import WeightSync

    probe = RoleProbe("cuda")
    assert probe.cuda and probe.prefix == "mem/peak_"
    with probe.role("big"):
        x = torch.ones(64 * MB, device="cuda")  # 256 MiB of fp32
        del x
    with probe.role("small"):
        torch.ones(1, device="cuda")
    m = probe.metrics()
    assert m["mem/peak_big"] >= 256 and m["mem/peak_small"] < m["mem/peak_big"] - 200, m
    try:
        import pynvml  # noqa: F401
        assert 0 <= m["gpu/util"] <= 100
    except ImportError:
        assert "gpu/util" not in m

    model, tok = tiny_gpt
    model.cuda()
    engine = NativeEngine(model, tok)
    prompts = ("12+34=", "50+50=", "7+8=")
    roles = Roles(engine=engine, reward=Reward(lambda c, row: float(len(c) % 2), tok),
                  algorithm=get_algorithm("grpo", beta=0.04), trainer=Trainer(model, TrainerConfig(lr=1e-4)),
                  weight_sync=WeightSync(model, engine), reference=Reference(model))
    ctl = Controller(roles, RLConfig(), SamplingParams(max_new_tokens=4), RolloutConfig(prompts_per_step=3, k=4),
                     rows=[{"prompt": p, "answer": "0"} for p in prompts],
                     prompt_ids=[tok.encode_prompt(p) for p in prompts], seed=0)
    metrics = ctl.step(1)
    for role in ("rollout", "reward", "reference", "advantages", "train", "sync"):
        assert 0 < metrics[f"mem/peak_{role}"] < torch.cuda.get_device_properties(0).total_memory / MB, role
