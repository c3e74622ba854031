"""The stages besides RL under trainer.strategy=fsdp2: 2 torchrun/gloo ranks on 127.0.0.1 against one process.

The worker job below runs the same training twice: in a plain process (strategy single, no process group) and
under torchrun with 2 ranks (strategy fsdp2: the model sharded, each rank on its share of every batch). Each run
writes its per-step losses and its final (gathered) weights; the tests compare them:

- SFT (gpt_mini): the supervised loop on batches of 5 demonstrations (3 rows on rank 0, 2 on rank 1); then, from
  the policy SFT sharded, the RL stage's frozen reference and a separate critic's trunk (plain copies);
- preference (gpt_mini): DPO on 7 pairs in batches of 3, one pair per micro-batch (the last batch has one pair:
  rank 1 runs a filler row at zero weight), and KTO on the same data unpaired (its reference point over the whole
  batch);
- reward model (tiny Llama): Bradley-Terry fitting in batches of 3 pairs, 2 epochs, then gathered whole (its
  head's bias aside: the loss does not read it, see case_reward_model);
- PPO (tiny Llama with a value head on the policy's trunk, gpt_mini with a separate critic): the critic's value
  pass (rank 0: 3 micro-batches, rank 1: 2), advantages whitened over every rank's rows, 3 trainer steps.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def launch(out: str, strategy: str, llama_dir: str, nproc: int) -> dict:
    """Run this file's job under torchrun with `nproc` ranks (0: a plain process) and read OUT."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    args = [__file__, out, strategy, llama_dir]
    if nproc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *args]
    else:
        cmd = [sys.executable, *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def gpt_mini(vocab: int = 16):
    from rlpost.models.gpt_mini import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=24, n_layer=2, n_head=2, n_embd=32))


def llama(folder: str):
    from transformers import AutoModelForCausalLM

    from rlpost.models import HFCausalLM

    return HFCausalLM(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


def weights(model) -> dict[str, torch.Tensor]:
    """The full weights, gathered when sharded (every rank calls it)."""
    from rlpost.distributed import full_state_dict

    return {k: v.detach().clone().cpu() for k, v in full_state_dict(model).items()}


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        wrong = (a + b + rng.choice([1, 10, -1])) % 200
        out.append({"prompt": f"{a:02d}+{b:02d}=", "chosen": f"{a + b:03d}", "rejected": f"{wrong:03d}"})
    return out


# ---------------------------------------------------------------------------- the cases

def case_sft(strategy: str) -> tuple[dict, dict]:
    from rlpost.config import Config
    from rlpost.critic import Critic
    from rlpost.distributed import is_sharded
    from rlpost.reference import Reference
    from rlpost.batch import Batch
    from rlpost.stages.sft import SupervisedStage

    cfg = Config()
    cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr, cfg.sft.warmup_steps, cfg.sft.save_every = 4, 5, 1e-3, 1, 0
    cfg.trainer.strategy = strategy
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 16, (int(n),), generator=g).tolist() for n in torch.randint(2, 5, (12,), generator=g)]
    comps = [torch.randint(3, 16, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (12,), generator=g)]
    model, logged = gpt_mini(), []
    ctx = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=0), log=logged.append,
                          check_stop=lambda save=None: None)
    stage = SupervisedStage(cfg.sft, cfg.trainer)
    stage.name = "sft"
    stage.set_examples(prompts, comps)
    stage.build_trainer(ctx, seed=0)
    losses = []
    step = stage.trainer.step
    stage.trainer.step = lambda batch, fn: (lambda m: losses.append(m["train/loss"]) or m)(step(batch, fn))
    stage.train(ctx)
    # what the RL stage copies from the policy SFT left (sharded under fsdp2): the reference, a separate critic
    batch = Batch.for_sft(prompts[:4], comps[:4], 0)
    ref = Reference(model, cfg.trainer)(batch).ref_logp
    critic = Critic.build(model, "separate", cfg.trainer)
    # (a sharded policy's critic trunk is sharded from the start: gathered here)
    return {"losses": losses, "ref_logp": ref.tolist(), "sharded": is_sharded(model)}, {**weights(model),
                                                         **{f"critic_trunk.{k}": v
                                                            for k, v in weights(critic.trunk).items()}}


def case_preference(strategy: str, loss_name: str) -> tuple[dict, dict]:
    from rlpost.config import Config
    from rlpost.distributed import is_sharded
    from rlpost.models.gpt_mini import CharTokenizer
    from rlpost.preference import get_preference_loss
    from rlpost.preference.data import read_preference_rows, tokenize_preferences
    from rlpost.preference.fit import train_preference

    cfg = Config()
    cfg.trainer.strategy = strategy
    pc = cfg.preference
    pc.epochs, pc.batch_size, pc.micro_batch_size, pc.lr, pc.warmup_steps = 1, 3, 1, 1e-3, 0
    tok = CharTokenizer("0123456789+=")
    data = tokenize_preferences(read_preference_rows(arithmetic_pairs(7)), tok, max_length=24)
    if loss_name == "kto":
        pc.batch_size = 5  # 14 unpaired rows: batches of 5, 5, 4
    model = gpt_mini(tok.vocab_size)
    records = []
    train_preference(model, tok, data, get_preference_loss(loss_name), pc, cfg.trainer, seed=0, log=records.append)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    return {"losses": losses, "skipped": sum(r.get("train/skipped_empty", 0.0) for r in records),
            "sharded": is_sharded(model)}, weights(model)


def case_reward_model(strategy: str, llama_dir: str) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    from rlpost.distributed import is_sharded
    from rlpost.env.reward_model import RewardModel, fit_reward_model
    from rlpost.models import HFTokenizer
    from rlpost.preference.data import read_preference_rows, tokenize_preferences

    tok = HFTokenizer(AutoTokenizer.from_pretrained(llama_dir))
    data = tokenize_preferences(read_preference_rows(arithmetic_pairs(8, seed=1)), tok, max_length=32)
    rm = RewardModel.from_policy(llama(llama_dir))
    if strategy == "fsdp2":
        rm.shard()
    records = []
    fit_reward_model(rm, data, data, pad_id=tok.pad_token_id, epochs=2, batch_size=3, lr=1e-3, seed=0,
                     log=records.append)
    plain = rm.unsharded()
    scores = plain.score(data.batch(data.sequences([0, 1, 2]), tok.pad_token_id))
    evals = [r["rm/eval_loss"] for r in records if "rm/eval_loss" in r]
    # the head's bias is not compared: the Bradley-Terry loss reads only differences of rewards, so its gradient is
    # float noise (1e-9), which AdamW scales up to ~lr per step, differently in each run; so are absolute scores
    state = {k: v for k, v in plain.state_dict().items() if k != "head.bias"}
    return {"eval_loss": evals, "margins": (scores[0::2] - scores[1::2]).tolist(), "sharded": is_sharded(rm),
            "plain": not any(is_sharded(m) for m in plain.modules())}, state


def ppo_batch(model, vocab: int):
    """8 rows: 2 prompts x 4 samples, left-padded prompts, responses of 1-5 tokens, outcome rewards."""
    g = torch.Generator().manual_seed(1)
    B, P, R = 8, 4, 5
    prompts = torch.randint(3, vocab, (2, P), generator=g).repeat_interleave(4, 0)
    ids = torch.cat([prompts, torch.randint(3, vocab, (B, R), generator=g)], 1)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3, 1])
    response = (torch.arange(R)[None] < lengths[:, None]).long()
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[4:, 0] = 0
    batch = scored_rows(model, ids, prompt_mask, response, g)
    return batch.replace(rewards=torch.randn(B, generator=g), group_ids=torch.arange(B) // 4)


def scored_rows(model, ids, prompt_mask, response, g):
    """The Batch of token ids [B, P + R] with prompt and response masks ([B, P], [B, R]; masked ids zeroed), and
    old / reference log-probs near `model`'s own (its log-probs plus and minus noise drawn from `g`)."""
    from rlpost.batch import Batch
    from rlpost.models import token_logprobs

    attention = torch.cat([prompt_mask, response], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), response], 1)
    batch = Batch(input_ids=ids * attention, attention_mask=attention, response_mask=response_mask)
    with torch.no_grad():
        logp = token_logprobs(model, batch)
    noise = 0.3 * torch.randn(ids.shape, generator=g)
    return batch.replace(old_logp=(logp + noise) * response_mask, ref_logp=(logp - noise.abs()) * response_mask)


PPO_ROWS = [list(range(0, 5)), list(range(5, 8))]  # uneven: rank 0 runs 3 micro-batches of 2, rank 1 two


def case_ppo(strategy: str, kind: str, llama_dir: str) -> tuple[dict, dict]:
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.config import TrainerConfig
    from rlpost.critic import Critic
    from rlpost.trainer import Trainer

    model = llama(llama_dir) if kind == "head" else gpt_mini()
    vocab = model.hf.config.vocab_size if kind == "head" else 16
    batch = ppo_batch(model, vocab)
    cfg = TrainerConfig(lr=1e-3, weight_decay=0.01, grad_clip=0.5, micro_batch_size=2, strategy=strategy)
    critic = Critic.build(model, kind, cfg)
    with torch.no_grad():  # a head that starts at zero reads nothing yet: give it weights
        critic.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    trainer = Trainer(model, cfg, critic=critic, critic_lr=3e-3)
    algo = get_algorithm("ppo")
    if strategy == "fsdp2":
        batch = batch.select(PPO_ROWS[dist.rank()])
    out = {"losses": [], "values": []}
    for _ in range(3):
        with torch.no_grad():
            scored = batch.replace(values=critic(batch))
        out["values"].append(scored.values.sum().item())
        m = trainer.step(algo.compute_advantages(scored), algo.compute_loss)
        out["losses"].append(m["train/loss"])
        out["value_loss"] = m.get("value/loss")
    out["values"] = dist.reduce_sum(out["values"][-1])  # the last value pass, summed over every rank's rows
    out["sharded"] = dist.is_sharded(model) and dist.is_sharded(critic)
    state = weights(model)
    state.update({f"critic.{k}": v for k, v in critic.full_state_dict().items()})
    return out, state


def job_stages(out: str, strategy: str, llama_dir: str) -> None:
    from rlpost import distributed as dist

    if strategy == "fsdp2":
        dist.init()
    result, tensors = {}, {}
    cases = {"sft": lambda: case_sft(strategy), "dpo": lambda: case_preference(strategy, "dpo"),
             "kto": lambda: case_preference(strategy, "kto"),
             "reward_model": lambda: case_reward_model(strategy, llama_dir),
             "ppo_head": lambda: case_ppo(strategy, "head", llama_dir),
             "ppo_separate": lambda: case_ppo(strategy, "separate", llama_dir)}
    for name, run in cases.items():
        t0 = time.perf_counter()
        numbers, state = run()
        result[name] = {**numbers, "seconds": time.perf_counter() - t0}
        tensors[name] = state
    if dist.is_main():
        torch.save(tensors, out + ".pt")
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


# ---------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("fsdp_stages")
    out = {}
    for strategy, nproc in (("single", 0), ("fsdp2", 2)):
        path = str(tmp / f"{strategy}.json")
        out[strategy] = launch(path, strategy, tiny_llama_dir, nproc)
        out[strategy + "_weights"] = torch.load(path + ".pt")
    return out


def close(a: list, b: list) -> float:
    """The largest difference, relative for numbers above 1 (a PPO loss of 20 carries float32's 2e-6 per unit)."""
    assert len(a) == len(b), (a, b)
    return max((abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b)), default=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sft", "dpo", "kto", "reward_model", "ppo_head", "ppo_separate"])
def test_two_ranks_fit_like_one_process(runs, case):
    one, two = runs["single"][case], runs["fsdp2"][case]
    diff = max_diff(runs["fsdp2_weights"][case], runs["single_weights"][case])
    print(f"{case}: weights max |diff| {diff:.2e}; 1 process {one}; 2 ranks {two}")
    assert diff < TOL
    assert two["sharded"] and not one["sharded"]  # the 2-rank run trained shards, the one process a whole model
    for key in ("losses", "eval_loss", "margins", "ref_logp"):
        if key in one:
            a, b = torch.tensor(one[key]).flatten().tolist(), torch.tensor(two[key]).flatten().tolist()
            assert close(a, b) < TOL, key
    if "losses" in one:
        assert len(set(one["losses"])) == len(one["losses"])  # every step trained
    if case.startswith("ppo"):
        assert close([one["values"], one["value_loss"]], [two["values"], two["value_loss"]]) < TOL
        assert one["values"] != 0.0
    if case in ("dpo", "kto"):
        assert one["skipped"] == two["skipped"] == 0  # the 1-pair batch trained on both, not skipped
    if case == "reward_model":
        assert two["plain"]  # gathered into a plain model that scores without the other rank


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_rlpost_train_shards_every_stage_under_torchrun(tmp_path, lora):
    """`rlpost train` on 2 ranks: SFT, DPO on a pairs file, a reward model, then 2 PPO steps with a separate critic
    on that reward; the stages' checkpoints (gathered by rank 0) equal one process's run of the same stages, and
    the 2-rank PPO checkpoint (the critic and its optimizer state in its shards) resumes in one process. With
    `lora` > 0 every stage trains rank-`lora` adapters over the sharded frozen base (model.lora)."""
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_pairs(30)))
    common = ["sft.steps=12", "sft.batch_size=8", f"preference.train_file={pairs}", "preference.epochs=1",
              "preference.batch_size=5", "reward_model.epochs=1", "reward_model.batch_size=8", "task.num_eval=10",
              "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "trainer.micro_batch_size=3", "threads=1",
              f"out_dir={tmp_path / 'runs'}", f"model.lora.r={lora}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "rlpost.cli", "train", *common, "run_name=two", "trainer.strategy=fsdp2",
           "rl.weight_sync=copy", "stages=[sft,preference,reward_model,rl]", "algorithm={name: ppo}", "rl.steps=2",
           "rl.save_every=1", "rollout.prompts_per_step=4", "rollout.k=2"]
    one = [sys.executable, "-m", "rlpost.cli", "train", *common, "run_name=one",
           "stages=[sft,preference,reward_model]"]
    for cmd in (two, one):
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    runs = tmp_path / "runs"
    lines = [json.loads(x) for x in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["stage"] == "rl"] == [1, 2]  # PPO ran, logged once (rank 0)
    assert (runs / "two" / "checkpoints" / "final" / "model.safetensors").exists()
    for stage, file in (("sft", "model.safetensors"), ("preference", "model.safetensors"),
                        ("reward_model", "model.safetensors"), ("reward_model", "reward_head.safetensors")):
        a, b = (load_file(runs / run / "checkpoints" / stage / file) for run in ("two", "one"))
        diff = max_diff(a, b)
        print(f"{stage}/{file}: 2 ranks vs 1 process max |diff| {diff:.2e}")
        assert diff < TOL
    shutil.rmtree(runs / "two" / "checkpoints" / "final")
    again = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", "--resume", str(runs / "two")], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    assert "resuming from" in again.stdout and "step_1" in again.stdout
    lines = [json.loads(x) for x in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["stage"] == "rl"] == [1, 2]
    assert (runs / "two" / "checkpoints" / "final" / "model.safetensors").exists()


def test_share_splits_rows_in_rank_order(monkeypatch):
    from rlpost import distributed as dist

    for n in (0, 1, 2, 5, 8):
        parts = []
        for r in range(3):
            monkeypatch.setattr(dist, "rank", lambda r=r: r)
            monkeypatch.setattr(dist, "world_size", lambda: 3)
            parts.append(list(dist.share(n)))
        assert sum(parts, []) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_lora_with_fsdp2_loads(tmp_path):
    from rlpost.config import load_config

    # LoRA under fsdp2 trains sharded adapters over a sharded frozen base (tests/test_fsdp_lora.py)
    for strategy in ("fsdp2", "single"):
        cfg = load_config(None, [f"out_dir={tmp_path}", f"trainer.strategy={strategy}", "model.lora.r=4"])
        assert cfg.trainer.strategy == strategy and cfg.model.lora.r == 4


def test_a_batch_smaller_than_the_ranks_is_refused(monkeypatch):
    from rlpost import distributed as dist
    from rlpost.config import Config
    from rlpost.stages.sft import SFTStage

    cfg = Config()
    cfg.trainer.strategy, cfg.sft.batch_size = "fsdp2", 1
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    ctx = SimpleNamespace(model=gpt_mini())
    with pytest.raises(ValueError, match="sft.batch_size=1 is smaller than the 2 ranks.*at least 2"):
        SFTStage(cfg.sft, cfg.trainer).build_trainer(ctx, seed=0)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    job_stages(*sys.argv[1:])
