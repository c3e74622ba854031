"""`rlpost export`: a plain model folder (LoRA adapters merged in) + tokenizer (rlpost/checkpoint.py's
`export_model`)."""

from __future__ import annotations

import argparse

from rlpost.checkpoint import export_model
from rlpost.commands.common import error
from rlpost.models import ModelLoadError


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a plain model folder (LoRA adapters merged in) + tokenizer from a run or checkpoint",
        description="Write SOURCE's policy as a plain model folder with its tokenizer: safetensors weights and "
                    "config.json that transformers.AutoModelForCausalLM.from_pretrained loads (gpt_mini: as GPT-2; "
                    "rlpost's load_model loads it as gpt_mini), with no peft needed. SOURCE is a run directory "
                    "(the weights of its newest checkpoint) or a checkpoint folder. A LoRA checkpoint "
                    "(model.lora: base weights + lora_adapter.safetensors) is merged: each weight becomes base + "
                    "B @ A * alpha / r. A folder without adapters is copied as it is.",
        epilog="e.g. rlpost export runs/lora-X --out exported/\n     rlpost export runs/lora-X/checkpoints/step_50 "
               "--out step50/", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="a run directory or a checkpoint folder")
    p.add_argument("--out", required=True, metavar="FOLDER", help="where the model folder is written")


def cmd_export(args) -> int:
    try:
        folder = export_model(args.source, args.out)
    except (ModelLoadError, ValueError, OSError) as e:
        return error(e, 1)
    print(f"rlpost export: {folder} -> {args.out}")
    return 0
