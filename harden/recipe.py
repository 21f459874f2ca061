"""Recipes: the YAML a release engineer commits next to a model, parsed into a strict, frozen, range-checked object.

Why strict: a recipe runs unattended in CI. A typo (`treshold:`) that silently fell back to a default would harden
the wrong way, so unknown keys, duplicate keys and out-of-range values are errors that name the key and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import BadInputError

TauMem = Literal["tau_mem"]  # "use the threshold calibrated on the reference prompts"
Threshold = Union[TauMem, float]
# what torch, numpy and JSON all take: a random seed is a non-negative 63-bit integer
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Strict(BaseModel):
    # NaN and infinity are never meaningful settings (a NaN gate bound would pass or fail every value)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info: ValidationInfo):
        """pydantic takes `true` as 1 for an int or float field: a YAML slip (`seed: yes`) must not become a seed."""
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and bool not in _flatten(cls.model_fields[info.field_name]
                                                                             .annotation):
            raise ValueError("expected a number or text, not a boolean (true/false/yes/no)")
        return value


def _check_threshold(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0.0 < value <= 1.0:
        raise ValueError(f"a threshold is an MS-SSIM value in (0, 1] or 'tau_mem', got {value}")
    return value


class ModelSection(_Strict):
    """The base pipeline: a Hub id or a local diffusers folder (relative paths resolve against the recipe)."""

    id: str = Field(min_length=1)
    revision: str | None = None  # a branch, tag or commit; the resolved commit is recorded in report.json
    variant: str | None = None  # e.g. fp16: load `*.fp16.safetensors` weights where the repo has them
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"
    allow_pickle: bool = False
    targets: str = "nemo"  # nemo (down + mid blocks, as the paper), all, or a regex on module names

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if v not in ("nemo", "all"):
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"targets must be nemo, all or a regular expression; {v!r} is not one: {err}") \
                    from None
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v


def _check_prompt(text: str) -> str:
    if not text.strip():
        raise ValueError("a prompt must have text (it is empty or only whitespace)")
    return text


class PromptItem(_Strict):
    prompt: str = Field(min_length=1)
    image: str | None = None  # a reference (training) image for this prompt, for verification SSIM
    variants: list[str] | None = None  # paraphrases of this prompt the audit also tries (docs/audit.md)

    _prompt = field_validator("prompt")(classmethod(lambda cls, v: _check_prompt(v)))


class PromptSource(_Strict):
    """Prompts inline, or from a file or URL: .txt (one per line), .jsonl (`caption`), .csv (`Caption` column)."""

    prompts: list[Union[str, PromptItem]] | None = None
    file: str | None = None  # a path (relative to the recipe) or an http(s) URL, which then needs sha256
    sha256: str | None = None
    field: str | None = None  # the jsonl key / csv column with the prompt (default caption / Caption)
    image_field: str | None = None  # jsonl key / csv column with a reference image path (relative to the file)
    where: dict[str, Union[str, int, float, bool]] | None = None  # keep only rows whose fields equal these values
    offset: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.prompts is None) == (self.file is None):
            raise ValueError("give exactly one of 'prompts' (an inline list) or 'file' (a path or URL)")
        if self.file and re.match(r"https?://", self.file) and not self.sha256:
            raise ValueError("a prompt file given as a URL needs its 'sha256', so that what runs is what was meant")
        if self.sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.prompts is not None and not self.prompts:
            raise ValueError("the inline prompt list is empty")
        for n, item in enumerate(self.prompts or (), 1):
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"inline prompt {n} is empty or only whitespace")
        return self


class ReferenceSection(PromptSource):
    """Non-memorized prompts: all of them give the per-neuron statistics; the first `tau_prompts` give tau_mem."""

    tau_prompts: int = Field(100, ge=2)
    batch_size: int = Field(256, ge=1)  # text-encoder batch for statistics


class DetectionSection(_Strict):
    """NeMo's first-step noise-difference score (official defaults)."""

    threshold: Threshold = "tau_mem"  # a prompt is memorized (and a seed kept) when its score is > this
    n_seeds: int = Field(10, ge=2, le=256)
    seed: Seed = 1
    num_inference_steps: int = Field(50, ge=2, le=1000)
    timestep_index: int = Field(1, ge=0)
    kernel_size: int = Field(11, ge=3, le=31)
    betas: tuple[float, ...] = (0.33, 0.33, 0.33)
    fp16_autocast: bool = True
    batch_size: int = Field(64, ge=1)  # samples per UNet forward
    # standard: torchmetrics >= 1.4.2; official_1_3_2: torchmetrics 1.3.2's cropped last scale, which the official
    # NeMo code pins and NeMo's tau_mem = 0.428 was measured with (docs/method.md)
    ms_ssim: Literal["standard", "official_1_3_2"] = "standard"

    _threshold = field_validator("threshold")(classmethod(lambda cls, v: _check_threshold(v)))

    @model_validator(mode="after")
    def _checks(self):
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.timestep_index >= self.num_inference_steps:
            raise ValueError("timestep_index must be smaller than num_inference_steps")
        if not self.betas or any(b <= 0 for b in self.betas):
            raise ValueError("betas must be a non-empty list of positive weights")
        return self


class LocalizationSection(_Strict):
    """NeMo's OOD initial selection and greedy refinement (official defaults)."""

    mode: Literal["exact", "fast"] = "exact"
    theta_start: float = Field(5.0, gt=0)
    theta_step: float = Field(0.25, gt=0)
    theta_min: float = Field(1.0, gt=0)
    use_theta: bool = True
    k_start: int = Field(0, ge=0)
    use_top_k: bool = True
    k_max: int = Field(1280, ge=1)
    tau_initial: Threshold = "tau_mem"
    tau_refine: Threshold = "tau_mem"
    rel_threshold: float | None = Field(None, gt=0)
    refine: bool = True
    factor: float = Field(0.0, ge=0.0, lt=1.0)  # deactivation multiplier while searching (pruning removes: 0)
    # batching of the search: null = auto (forward size: CUDA from free memory, CPU from the latent size; prompts
    # side by side to fill it; speculation with what is left, CUDA only). Results do not depend on them.
    parallel_prompts: int | None = Field(None, ge=1)  # prompts localized side by side, sharing UNet forwards
    speculate: int | None = Field(None, ge=1)  # initial-selection steps evaluated per UNet batch
    refine_block: int | None = Field(None, ge=1)  # speculative refinement trials per UNet batch
    batch_size: int | None = Field(None, ge=1)  # samples per UNet forward while localizing
    # stop a test at the first seed that fails it; null = auto: on, except exact mode on CUDA (`batching`)
    early_reject: bool | None = None
    only_detected: bool = True  # localize only prompts whose score is above the detection threshold
    # fast mode: also localize every prompt in exact mode and compare both in the report (neurons, scores and the
    # verification metrics of both pruned models). It costs an exact-mode run; turn it off once the modes agree.
    compare: bool = True
    # the most initial-selection steps (theta, k) one prompt's search may take: a theta_step near zero or a huge
    # k_max would otherwise grow the search without end. NeMo's defaults take 16 (theta 5 -> 1 by 0.25).
    max_schedule_steps: int = Field(10_000, ge=1)

    _taus = field_validator("tau_initial", "tau_refine")(classmethod(lambda cls, v: _check_threshold(v)))

    @model_validator(mode="after")
    def _checks(self):
        if self.theta_start < self.theta_min:
            raise ValueError("theta_start must be >= theta_min")
        if not self.use_theta and not self.use_top_k:
            raise ValueError("use_theta and use_top_k cannot both be false: initial selection would select nothing")
        return self


GATE_METRICS = {
    # name: (what it measures, which direction is better)
    "memorized_score_after_max": ("max NeMo score of the detected memorized prompts after pruning", "lower"),
    "memorized_score_after_mean": ("mean NeMo score of the detected memorized prompts after pruning", "lower"),
    "mitigated_fraction": ("fraction of detected prompts whose score after pruning is <= the threshold", "higher"),
    "memorized_ssim_after_max": ("max best-of-seeds SSIM to the reference image after pruning", "lower"),
    "heldout_ssim_median": ("median SSIM between base and hardened held-out images at the same seeds", "higher"),
    "heldout_ssim_min": ("min SSIM between base and hardened held-out images at the same seeds", "higher"),
    "heldout_alignment_drop": ("mean alignment before minus after (shipped memorizer only)", "lower"),
    "heldout_clip_drop": ("mean CLIP score before minus after (needs verify.clip_model)", "lower"),
    "neurons_total": ("number of neurons pruned", "lower"),
    # the audit (harden.audit; needs an enabled `audit:` section): shares of the audited memorized images that the
    # hardened model still reproduces (best seed's similarity >= the audit threshold)
    "prompt_reproduced_fraction": ("share of memorized images reproduced from their own prompts (audit)", "lower"),
    "paraphrase_reproduced_fraction": ("share reproduced from a paraphrase of their prompt (audit)", "lower"),
    "attack_reproduced_fraction": ("share recovered by the embedding attack (audit, dori.md)", "lower"),
    "control_reproduced_fraction": ("share of never-seen control images the same attack paints (audit)", "lower"),
}
AUDIT_GATES = ("prompt_reproduced_fraction", "paraphrase_reproduced_fraction", "attack_reproduced_fraction",
               "control_reproduced_fraction")


class Gate(_Strict):
    min: Union[float, TauMem, None] = None
    max: Union[float, TauMem, None] = None

    @model_validator(mode="after")
    def _one_bound(self):
        if (self.min is None) == (self.max is None):
            raise ValueError("a gate has exactly one bound: 'min' or 'max'")
        return self


class VerifySection(_Strict):
    """Held-out quality and memorization before/after, at fixed seeds, with gates that fail the run."""

    held_out: PromptSource | None = None
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1, max_length=64)
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    generate: bool = True  # False: only the NeMo score before/after (no full generations)
    batch_images: int | None = Field(None, ge=1)  # images per pipeline call (null: from the device and image size)
    control: bool = True  # a random-neuron control with the same per-layer counts
    clip_model: str | None = None  # a transformers CLIPModel (Hub id or local folder) for a CLIP score
    gates: dict[str, Gate] = Field(default_factory=dict)

    @field_validator("gates")
    @classmethod
    def _known_gates(cls, gates):
        for name in gates:
            if name not in GATE_METRICS:
                raise ValueError(f"unknown gate {name!r}{_suggest(name, GATE_METRICS)}")
        return gates


class AuditSection(_Strict):
    """`harden audit` and the audit stage (docs/audit.md): what the weights still give back from the prompts, from
    paraphrases and under the embedding attack of dori.md §2, with a control on images the model never saw.
    Attack defaults are the published ones (Adam, lr 0.1, 50 steps, batch 8)."""

    enabled: bool = False  # off unless the recipe asks (the stage generates and attacks on 3 models)
    seeds: list[Seed] | None = Field(None, min_length=1, max_length=64)  # null: verify.seeds
    steps: int | None = Field(None, ge=1, le=1000)  # sampling steps; null: verify.steps
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)  # null: verify.guidance_scale
    attack_steps: int = Field(50, ge=1, le=100_000)
    attack_lr: float = Field(0.1, gt=0.0, le=100.0)
    attack_batch: int = Field(8, ge=1, le=1024)  # noise draws (x_t, t) per embedding and step
    restarts: int = Field(1, ge=0, le=64)  # random-noise starts per image, besides the prompt's embedding
    prompt_start: bool = True  # also attack from the prompt's own embedding
    paraphrases: int = Field(3, ge=0, le=64)  # automatic perturbations per prompt (file `variants` come on top)
    metric: Literal["ssim", "sscd"] = "ssim"
    thresholds: dict[Literal["ssim", "sscd"], float] = Field(default_factory=lambda: {"ssim": 0.7, "sscd": 0.5})
    sscd_model: str | None = None  # a local TorchScript SSCD file (relative to the recipe); never downloaded
    # images the model never saw: a listing (.txt, one path per line, or .jsonl with `image` and an optional
    # `caption`; paths relative to the listing) or a list of image paths (relative to the recipe)
    control_images: Union[str, list[str], None] = None
    control_bound: float = Field(0.25, ge=0.0, le=1.0)  # control share above this: the audit is inconclusive
    surrogate_agreement: float = Field(0.5, gt=0.0, le=1.0)  # share of other seeds a surrogate must agree with
    batch_size: int | None = Field(None, ge=1)  # samples per UNet forward in the attack (null: from the device)
    seed: Seed | None = None  # null: the recipe's seed

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v):
        for name, value in v.items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"the {name} threshold must be in (0, 1], got {value}")
        return {"ssim": 0.7, "sscd": 0.5, **v}

    @model_validator(mode="after")
    def _checks(self):
        if self.metric == "sscd" and not self.sscd_model:
            raise ValueError("metric sscd needs sscd_model (a local TorchScript file)")
        if not self.prompt_start and self.restarts == 0:
            raise ValueError("the attack needs a start: prompt_start true or restarts >= 1")
        return self

    @property
    def threshold(self) -> float:
        return self.thresholds[self.metric]


class ExportSection(_Strict):
    layout: Literal["compact", "dense", "both"] = "compact"
    publish_prompts: bool = False  # write memorized prompt texts into report.json / the card
    figures: bool = True

    @property
    def layouts(self) -> tuple[str, ...]:
        return ("compact", "dense") if self.layout == "both" else (self.layout,)


class RepairSection(_Strict):
    """Adversarial fine-tuning after pruning (dori.md §3; docs/repair.md): L = retain_weight * L_retain + adv_weight *
    L_adv. Off by default (`enabled: false` keeps the prune-only pipeline); every default is documented in
    recipes/README.md."""

    enabled: bool = False
    seed: Seed | None = None  # null: the recipe's top-level seed
    steps: int = Field(150, ge=1, le=1_000_000)  # optimizer steps at most (early stop may end sooner)
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=1e-2)  # above 1e-2 a full fine-tune of a diffusion UNet diverges
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)  # max global gradient norm; null: no clipping
    train: str = "all"  # which UNet parameters train: all, or a regex on parameter names (e.g. "attn2|up_blocks")
    adv_weight: float = Field(1.0, ge=0.0, le=100.0)  # lambda, the weight of L_adv
    retain_weight: float = Field(1.0, gt=0.0, le=100.0)
    batch: int = Field(32, ge=1)  # retain samples per step
    adv_batch: int = Field(32, ge=1)  # adversarial samples per step, spread evenly over the memorized prompts
    # L_retain: null = data-free distillation on the teacher's own generations of the reference prompts;
    # or user image-caption pairs (`file` + `image_field`, the PromptSource format): the ordinary diffusion loss
    retain: PromptSource | None = None
    teacher: Literal["base", "pruned"] = "base"  # whose noise predictions data-free distillation matches
    retain_prompts: int | None = Field(None, ge=1)  # reference prompts generated for distillation (null: all)
    retain_seeds: int = Field(1, ge=1, le=64)  # generations per reference prompt
    empty_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # retain samples with the empty caption (unconditional)
    pool: int = Field(2048, ge=16)  # distillation samples (x_t, t, caption, teacher output) computed once
    # L_adv: per memorized prompt, the prompt's embedding, `paraphrases` variants, and attack embeddings (1 from the
    # prompt's embedding + `restarts` from random starts) regenerated against the current weights
    paraphrases: int = Field(2, ge=0, le=16)
    restarts: int = Field(1, ge=0, le=16)  # random-start attacks per memorized prompt (besides the prompt start)
    attack_steps: int = Field(30, ge=1)  # a fresh attack's Adam steps (at the start and at every restart)
    attack_lr: float = Field(0.1, gt=0.0, le=10.0)
    attack_batch: int = Field(4, ge=1)  # noise draws per attack embedding and step
    refresh_every: int = Field(10, ge=1)  # training steps between attack refreshes
    refresh_steps: int = Field(10, ge=1)  # warm-started Adam steps per refresh
    restart_every: int = Field(4, ge=0)  # every Nth refresh restarts the attacks from scratch (0: never)
    replay: int = Field(2, ge=0, le=64)  # earlier attack embeddings per prompt kept in the adversarial set
    surrogate_seeds: int = Field(8, ge=1, le=256)  # seeds tried for each prompt's surrogate target
    # early stop: every `probe_every` steps (0: never) generate from the fresh attack and prompt embeddings at
    # `probe_seeds`; stop once at most `stop_at` memorized images are reproduced (audit similarity and threshold)
    probe_every: int = Field(50, ge=0)
    probe_seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1, max_length=64)
    stop_at: int = Field(0, ge=0)
    min_steps: int = Field(0, ge=0)  # no early stop before this step
    checkpoint_every: int = Field(50, ge=1)  # steps between resumable checkpoints (repair/checkpoints/)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % more time
    autocast: Literal["auto", "none", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA where supported, none on CPU

    @field_validator("train")
    @classmethod
    def _train(cls, v):
        if v != "all":
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"train must be 'all' or a regular expression over parameter names: {err}") from None
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.retain is not None and self.retain.image_field is None:
            raise ValueError("retain pairs need 'image_field' (the column with each caption's image)")
        return self


class HubSection(_Strict):
    repo_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    private: bool = False
    create_pr: bool = False
    revision: str | None = None
    license: str | None = None
    layout: Literal["compact", "dense"] | None = None  # which export to push when layout is both (default compact)


class Recipe(_Strict):
    model: ModelSection
    memorized: PromptSource
    reference: ReferenceSection
    detection: DetectionSection = Field(default_factory=DetectionSection)
    localization: LocalizationSection = Field(default_factory=LocalizationSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    export: ExportSection = Field(default_factory=ExportSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    repair: RepairSection = Field(default_factory=RepairSection)
    hub: HubSection | None = None
    seed: Seed = 0  # for the random-neuron control and anything else random
    name: str | None = None


# ---------------------------------------------------------------------------------------------------- YAML loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""


def _construct_mapping(loader, node, deep=False):
    """Duplicates among a mapping's own keys are refused; YAML merge keys (`<<: *defaults`) are allowed, and the
    mapping's own keys override what they merge (the YAML rule), so those are not duplicates."""
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, (list, dict, set)):
            raise BadInputError(f"a key at line {line} is a {type(key).__name__}; recipe keys are names",
                                "write the key as plain text")
        if key in seen:
            raise BadInputError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})",
                                "keep one of them")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the location `loc` (to list its valid keys)."""
    model: Any = Recipe
    skip = False  # the next part is a dict key or list index, not a field name
    for part in loc[:-1]:
        if skip or isinstance(part, int):
            skip = False
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return None
        ann = fields[part].annotation
        skip = getattr(ann, "__origin__", None) is dict
        model = next((a for a in _flatten(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _flatten(ann) -> list:
    args = getattr(ann, "__args__", None)
    return [ann] if not args else [x for a in args for x in _flatten(a)]


_UNION_TAG = re.compile(r"[\[\](]|^(str|float|int|bool|none|PromptItem)$")  # pydantic's union-branch loc parts


def _explain(err: ValidationError, source: str) -> BadInputError:
    """One line for the most useful of pydantic's errors (an unknown key first, then the first value error)."""
    errors = err.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    first = (unknown or errors)[0]
    deeper = [e for e in errors if len(_clean(e["loc"])) > len(_clean(first["loc"])) and
              _clean(e["loc"])[:len(_clean(first["loc"]))] == _clean(first["loc"])]
    if first["type"].endswith("_type") and deeper:  # a union: the branch the value has the shape of says more
        first = deeper[0]
    loc = _clean(first["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = list(getattr(_model_at(loc), "model_fields", {}))
        return BadInputError(f"{source}: unknown key {where!r}{_suggest(loc[-1], valid)}",
                             f"valid keys here: {', '.join(valid)}" if valid else "remove it")
    if first["type"] == "missing":
        return BadInputError(f"{source}: missing required key {where!r}", "see recipes/README.md")
    same_place = [e for e in errors if _clean(e["loc"]) == loc]  # the branches of a union, e.g. 'tau_mem' | float
    msg = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same_place))
    msg = msg.replace(" or Input should be ", " or ")
    got = first.get("input")
    if not isinstance(got, (dict, list)) and repr(got) not in msg and str(got) not in msg:
        msg += f" (got {got!r})"
    return BadInputError(f"{source}: {where}: {msg}", "fix the value; see recipes/README.md")


def _clean(loc) -> tuple:
    return tuple(p for p in loc if isinstance(p, int) or not _UNION_TAG.search(p))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise BadInputError(f"{source}: a recipe is a YAML mapping of sections", "see recipes/*.yaml for examples")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from (relative paths resolve against `folder`)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    folder: Path
    text: str
    sha256: str


def load_recipe(path: Path) -> LoadedRecipe:
    """Read, check and freeze a recipe file. Raises BadInputError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe {path} does not exist", "give the path of a recipe YAML file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise BadInputError(f"cannot read recipe {path}: {err.strerror}", "check its permissions") from None
    try:
        text = raw.decode("utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text", "save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BadInputError(f"{path.name}: invalid YAML{where}: {getattr(err, 'problem', err)}",
                            "fix the YAML syntax") from None
    except RecursionError:
        raise BadInputError(f"{path.name}: nested too deeply to be a recipe", "a recipe is a few levels deep; "
                            "see recipes/*.yaml") from None
    try:
        recipe = parse_recipe(data, path.name)
    except RecursionError:
        raise BadInputError(f"{path.name}: nested too deeply to be a recipe", "see recipes/*.yaml") from None
    return LoadedRecipe(recipe=recipe, path=path.resolve(), folder=path.resolve().parent, text=text,
                        sha256=hashlib.sha256(raw).hexdigest())


PACKAGE_PREFIX = "zoo:"  # `zoo:memorizer` = the folder shipped inside the package (harden/zoo/memorizer)


def package_path(value: str) -> Path:
    """A path inside harden's shipped zoo (`zoo:memorizer/prompts.jsonl`); works for any kind of install."""
    zoo = (Path(__file__).parent / "zoo").resolve()
    path = (zoo / value[len(PACKAGE_PREFIX):]).resolve()
    if zoo not in path.parents or not path.exists():
        raise BadInputError(f"{value!r} is not in harden's zoo", "use zoo:memorizer (the shipped demo model)")
    return path


def resolve_model_path(model_id: str, folder: Path) -> Path | None:
    """A local folder for `model_id`, or None when it is a Hub id. Relative paths resolve against the recipe folder.

    Why the rule: `org/name` is both a valid Hub id and a valid relative path; an existing folder wins, and an id
    that starts like a path (`./`, `../`, `/`, `~`) is always local, so a missing folder is an error, not a download.
    `zoo:NAME` is a model shipped inside harden.
    """
    if model_id.startswith(PACKAGE_PREFIX):
        return package_path(model_id)
    candidate = (folder / Path(model_id).expanduser()).resolve()
    if candidate.exists():
        return candidate
    if model_id.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:[\\/]", model_id) or model_id.count("/") > 1:
        raise BadInputError(f"model folder {candidate} does not exist",
                            "fix model.id: a local diffusers folder (relative to the recipe) or a Hub id org/name")
    return None
