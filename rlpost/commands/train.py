"""`rlpost train`: run a recipe's stages; `--nproc N` relaunches it under torchrun, `--resume` continues a run."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

from rlpost.commands.common import count, error, recipe_and_overrides, recipe_arguments, recipe_base, run_job
from rlpost.config import Config, ConfigError, load_config
from rlpost.reaper import Reaper
from rlpost.run import resume_config, saved_config, train
from rlpost.schema import describe

TRAIN_EPILOG = ("config keys (recipe YAML sections or key=value overrides), default, meaning:\n"
                + "\n".join(describe(Config)))


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="run a recipe: SFT on demonstrations, then RL against a reward",
        description="Run a recipe (default: the embedded gpt_mini arithmetic pipeline). Settings come from the "
                    "defaults, then the recipe file, then key=value overrides (dotted, e.g. rl.steps=20).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest complete checkpoint, with its saved "
                        "config; key=value overrides apply to it, and (as a recipe given too) may change only "
                        "the layout keys (micro-batches, gradient checkpointing, ...: docs/cli.md)")
    p.add_argument("--nproc", type=count, metavar="N",
                   help="launch N processes on this machine with torchrun (127.0.0.1) and train sharded: adds "
                        "trainer.strategy=fsdp2 (with --resume: the saved config's); "
                        "several machines: run torchrun yourself")


def cmd_train(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    if args.nproc and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args.nproc, recipe, overrides, args.resume)
    changes = None
    try:
        if args.resume:  # the saved config, with the layout keys the command line changes (others refused)
            cfg, changes = resumable_config(args.resume, recipe, overrides)
        else:
            cfg = load_config(recipe, overrides)
    except (ConfigError, ValueError) as e:
        return error(e, 2)
    return run_job(lambda: train(cfg, recipe_base(recipe), resume=args.resume, layout_changes=changes))


def launch_torchrun(nproc: int, recipe: str | None, overrides: list[str], resume: str | None) -> int:
    """`rlpost train` again under torchrun, `nproc` ranks on this machine; its exit code. A resumed run keeps
    its saved config (which must say trainer.strategy=fsdp2)."""
    with socket.socket() as s:  # a free port on the loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "rlpost.cli", "train", *([recipe] if recipe else []),
           *overrides, *(["--resume", resume] if resume else ["trainer.strategy=fsdp2"])]
    print("rlpost: " + " ".join(cmd[1:]), flush=True)
    reaper = Reaper.start()  # torchrun and its ranks would train on for good after a SIGKILL of this process
    # SIGTERM or Ctrl-C here is passed on to torchrun once, which passes it to every rank: they stop at the next step
    # boundary after a checkpoint, as one process does. Its own session: a terminal's Ctrl-C reaches this process
    # alone, so torchrun gets one signal, not two (a second stops at once).
    proc = subprocess.Popen(cmd, start_new_session=True)
    signals: list[int] = []

    def forward(signum, frame):
        if signals:  # a second signal: stop at once (the reaper kills what is left)
            raise KeyboardInterrupt
        signals.append(signum)
        print(f"rlpost: {signal.Signals(signum).name}: passed on to torchrun's ranks, which stop at the next step "
              "boundary (again to stop now)", file=sys.stderr, flush=True)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    ended = False
    try:
        code = proc.wait()
        ended = True
    except KeyboardInterrupt:  # the second signal (or Ctrl-C before the handlers were in place)
        print("rlpost: stopped at once", file=sys.stderr, flush=True)
        code = 128 + (signals[0] if signals else signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not ended:
            proc.kill()
            proc.wait()
        if reaper is not None and ended:  # else this process ends with the exception, and the reaper kills the ranks
            reaper.stop()
    return 128 + signals[0] if signals and code != 0 else code  # 143 / 130, as one process stopped by it


def resumable_config(run_dir: str, recipe: str | None, overrides: list[str]):
    """(config, layout changes): the config saved in `run_dir`, with the layout keys (micro-batches, gradient
    checkpointing, ...) that the command line sets otherwise; any other difference is refused here, before any
    work (ConfigError naming the keys: rlpost.run.resume_config). Overrides alone apply on the saved config, so
    each of them is a change asked for (a key whose default changed since the run started too); a recipe is a
    whole config, compared with the saved one."""
    if recipe:
        return resume_config(run_dir, load_config(recipe, overrides))
    given = load_config(None, overrides, base=saved_config(run_dir)) if overrides else None
    return resume_config(run_dir, given, on_saved=True)
