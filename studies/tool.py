"""The command line the organism's measuring tools share (`evaluate`, `pruning_cost`, `redundancy`): which model,
how many CPU threads, where to write the JSON. One place, so the three keep the same flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harden.zoo import MEMORIZER_DIR


def parser(doc: str, json_help: str = "also write the measurements to this file") -> argparse.ArgumentParser:
    """An argument parser described by the first line of `doc`, with --model, --json and --threads."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0])
    out.add_argument("--model", type=Path, default=MEMORIZER_DIR)
    out.add_argument("--json", type=Path, help=json_help)
    out.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return out


def parse(args_parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, and set torch's thread count before any model is loaded."""
    args = args_parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")


def log(message: str) -> None:
    print(message, flush=True)
