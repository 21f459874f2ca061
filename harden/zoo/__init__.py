"""The model organism: a tiny Stable-Diffusion-style pipeline trained to memorize 8 captions verbatim.

`MEMORIZER_DIR` is the shipped folder (a stock `StableDiffusionPipeline` plus prompts.jsonl, images/, harden_zoo.json
and MANIFEST.sha256); `harden.zoo.alignment.alignment` scores procedural captions without any weights.
"""

from pathlib import Path

from .folder import check_manifest, load_config, caption_rows

MEMORIZER_DIR = Path(__file__).parent / "memorizer"

__all__ = ["MEMORIZER_DIR", "check_manifest", "load_config", "caption_rows"]
