"""The `rlpost` subcommands (rlpost/cli.py dispatches to them from its table): one module per command.

    common.py      what several commands share: the recipe arguments, run names, the run's exit codes
    train.py       rlpost train (and --nproc through torchrun, --resume)
    rm.py          rlpost rm: a Bradley-Terry reward model fitted and saved
    prm.py         rlpost prm: a process reward model on Monte-Carlo step labels (and an outcome model)
    dpo.py         rlpost dpo: the stage list [sft, eval, preference, eval] run as `rlpost train` runs it
    curate.py      rlpost curate
    eval.py        rlpost eval
    plan.py        rlpost plan memory / plan throughput
    search.py      rlpost search
    report.py      rlpost report
    export.py      rlpost export
    listings.py    rlpost algorithms / rewards / envs

Each module has, per command, `add_<name>(sub)` (its argparse parser) and `cmd_<name>(args) -> int` (the
exit code).
"""
