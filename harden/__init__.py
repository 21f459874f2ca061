"""harden: remove memorization neurons from a diffusion model before release (NeMo localization + pruning).

The library API, imported lazily so that `import harden` stays cheap:

    from harden import load_recipe, run_recipe, load_hardened, NeuronSet
    summary = run_recipe(load_recipe("recipes/demo.yaml"), "runs/demo")
"""

__version__ = "0.2.0"

_API = {"load_recipe": "recipe", "run_recipe": "runner", "load_hardened": "checkpoint", "NeuronSet": "neurons"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'harden' has no attribute {name!r}")
