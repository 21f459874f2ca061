"""harden: remove memorization neurons from a diffusion model before release (NeMo localization + pruning)."""

__version__ = "0.2.0"
