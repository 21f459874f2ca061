"""`harden scan`: find the memorized prompts in a caption set with cheap detection scores (Wen et al.'s text-conditional
noise magnitude, NeMo's first-step score, MemAttn's attention entropy), in resumable shards, on one process or many.

    from harden.scan import ScanJob, ScanSettings, run_scan
    summary = run_scan(ScanJob("zoo:memorizer", "captions.jsonl", Path("scan")))
"""

from .run import ScanJob, merge, run_scan
from .scores import CaptionScorer, ScanSettings

__all__ = ["CaptionScorer", "ScanJob", "ScanSettings", "merge", "run_scan"]
