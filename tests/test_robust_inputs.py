"""Bad input fails before the work, with one line and exit 2, never a traceback (issue 29, families 2, 3, 7, 8).

`harden validate` and the start of `harden run` share one preflight (harden.preflight); these tests drive the real
CLI on real files: recipes, prompt files, images, model configs (the shipped memorizer's, or a copy of them), run
folders. The loaders are fuzzed with hypothesis: whatever the input, the exit code is 0 or 2.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planted_model import recipe_dict, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.cli.ui import known_failure
from harden.errors import BadInputError, Terminated
from harden.recipe import Recipe
from harden.zoo import MEMORIZER_DIR

runner = CliRunner()
# the shipped memorizer: 16x16 latents, so MS-SSIM needs 2 scales and kernel 7 (as recipes/demo.yaml)
ZOO = {"model": {"id": "zoo:memorizer", "device": "cpu"},
       "detection": {"threshold": 0.428, "kernel_size": 7, "betas": [0.5, 0.5]}}


def _recipe(folder: Path, name: str = "recipe.yaml", **sections) -> Path:
    if "file" in sections.get("memorized", {}):
        sections["memorized"] = {"prompts": None, **sections["memorized"]}  # replaces the inline list
    return write_recipe(folder, name, **{**copy.deepcopy(ZOO), **sections})


def _validate(recipe: Path, *extra: str):
    return runner.invoke(app, ["validate", str(recipe), *extra])


def _assert_one_line(result, code: int = 2, *needles: str) -> str:
    """Exit `code`, no exception escaped, stderr is exactly one `error:` line containing the needles."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _bad(result, *needles: str) -> str:
    return _assert_one_line(result, 2, *needles)


def _config_copy(root: Path, **unet_config) -> Path:
    """The memorizer's configuration files only (no weights): what validate reads of a local model."""
    model = root / "configs"
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                "text_encoder/config.json"):
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MEMORIZER_DIR / rel, model / rel)
    if unet_config:
        config = json.loads((model / "unet/config.json").read_text())
        (model / "unet/config.json").write_text(json.dumps({**config, **unet_config}))
    return model


def test_a_good_recipe_validates(tmp_path):
    result = _validate(_recipe(tmp_path))
    assert result.exit_code == 0, result.output
    assert "valid; model local folder" in result.stdout and "3 memorized" in result.stdout


# ---------------------------------------------------------------------------------------- family 2: preflight


@pytest.mark.parametrize("section,value,needle", [
    ("seed", 2**63, "seed: Input should be less than or equal to 9223372036854775807"),
    ("detection", {"seed": 2**64}, "detection.seed"),
    ("verify", {"seeds": [0, 2**63]}, "verify.seeds.1"),
    ("seed", -1, "greater than or equal to 0"),
])
def test_seeds_torch_cannot_take_are_refused(tmp_path, section, value, needle):
    _bad(_validate(_recipe(tmp_path, **{section: value})), needle)


def test_seed_at_the_63_bit_limit_is_accepted(tmp_path):
    assert _validate(_recipe(tmp_path, seed=2**63 - 1, verify={"seeds": [2**63 - 1]})).exit_code == 0


@pytest.mark.parametrize("key,value", [("height", 100), ("width", 36)])
def test_image_sizes_diffusers_refuses(tmp_path, key, value):
    _bad(_validate(_recipe(tmp_path, verify={key: value})), f"verify.{key}: {value} is not a multiple of 8")
    assert _validate(_recipe(tmp_path, verify={key: 96})).exit_code == 0


def test_image_size_multiple_follows_the_vae(tmp_path):
    model = _config_copy(tmp_path)
    vae = json.loads((model / "vae/config.json").read_text())
    (model / "vae/config.json").write_text(json.dumps({**vae, "block_out_channels": [32, 32, 32, 32, 32]}))
    _bad(_validate(_recipe(tmp_path, model={"id": str(model)}, verify={"height": 24})), "not a multiple of 16")


def test_a_reference_image_that_is_not_an_image(tmp_path):
    recipe = _recipe(tmp_path)
    (tmp_path / "astronaut.png").write_text("this is not a PNG")
    _bad(_validate(recipe), "reference image astronaut.png cannot be read as an image")


def test_ms_ssim_scales_larger_than_the_latents_fail_at_validate(tmp_path):
    """The default 3 scales with an 11-pixel window need more than 40 latent pixels; the memorizer has 16."""
    recipe = _recipe(tmp_path, detection={"threshold": 0.428, "kernel_size": 11, "betas": [0.33, 0.33, 0.33]})
    _bad(_validate(recipe), "latents of (16, 16) are too small for 3-scale MS-SSIM")
    bigger = _config_copy(tmp_path, sample_size=64)
    recipe = _recipe(tmp_path, model={"id": str(bigger)},
                     detection={"threshold": 0.428, "kernel_size": 11, "betas": [0.33, 0.33, 0.33]})
    assert _validate(recipe).exit_code == 0


def test_a_scheduler_that_cannot_take_the_detection_steps(tmp_path):
    model = _config_copy(tmp_path)
    config = json.loads((model / "scheduler/scheduler_config.json").read_text())
    (model / "scheduler/scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": 20}))
    _bad(_validate(_recipe(tmp_path, model={"id": str(model)})), "scheduler cannot take these settings")


@pytest.mark.parametrize("device,needle", [
    ("bogus", "unknown device 'bogus'"),
    ("mps", "mps (Apple Metal) is not available"),
    ("cuda:7", "cuda:7"),
])
def test_devices_this_machine_does_not_have(tmp_path, device, needle):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    recipe = _recipe(tmp_path)
    _bad(_validate(recipe, "--device", device), needle)
    result = runner.invoke(app, ["run", str(recipe), "--device", device, "--out", str(tmp_path / "out")])
    _bad(result, needle)
    assert not (tmp_path / "out").exists()
    if device in ("mps", "cuda:7"):  # the recipe's own device is checked the same way
        _bad(_validate(_recipe(tmp_path, "r2.yaml", model={"id": "zoo:memorizer", "device": device})), needle)
    (tmp_path / "neurons.json").write_text('{"layers": {}}')
    _bad(runner.invoke(app, ["prune", "zoo:memorizer", "--neurons", str(tmp_path / "neurons.json"), "--out",
                             str(tmp_path / "pruned"), "--device", device]), needle)  # every command picks alike
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("localization,steps", [
    ({"theta_step": 1e-9, "use_top_k": False}, 4000000000),
    ({"k_max": 10**12, "use_theta": False}, 10**12),
    ({"theta_step": 0.0001, "use_top_k": False, "max_schedule_steps": 40000}, 40000),  # at the bound: accepted
])
def test_the_localization_schedule_is_bounded_by_the_recipe(tmp_path, localization, steps):
    result = _validate(_recipe(tmp_path, localization=localization))
    bound = localization.get("max_schedule_steps", 10_000)
    if steps <= bound:
        assert result.exit_code == 0, result.output
    else:
        _bad(result, f"would take {steps} steps per prompt", f"max_schedule_steps = {bound}")


def test_schedule_length_matches_the_schedule_itself():
    from harden.nemo.localize import LocalizeSettings, schedule
    from harden.preflight import schedule_length
    from harden.recipe import LocalizationSection

    for kwargs in ({}, {"theta_step": 0.1}, {"theta_step": 0.3, "theta_min": 1.1}, {"use_theta": False, "k_max": 7},
                   {"use_top_k": False}, {"k_start": 5, "k_max": 9}, {"theta_start": 1.0}):
        loc = LocalizationSection(**kwargs)
        settings = LocalizeSettings(**{k: getattr(loc, k) for k in ("theta_start", "theta_step", "theta_min",
                                                                     "use_theta", "k_start", "use_top_k", "k_max")})
        assert schedule_length(loc) == len(schedule(settings)), kwargs


def test_out_under_a_file_is_refused_before_anything_is_written(tmp_path):
    recipe = _recipe(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    _bad(_validate(recipe, "--out", str(out)), "is a file, so no folder can be made under it")
    _bad(runner.invoke(app, ["run", str(recipe), "--out", str(out)]), "is a file")
    (tmp_path / "neurons.json").write_text('{"layers": {}}')
    _bad(runner.invoke(app, ["prune", "zoo:memorizer", "--neurons", str(tmp_path / "neurons.json"), "--out",
                             str(out)]), "is a file")
    assert (tmp_path / "afile").read_text() == "x"


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: mode 0555, or (as root, who ignores modes) /sys where it refuses."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    for candidate in (folder, Path("/sys")):
        try:
            probe = candidate / ".harden-test-probe"
            probe.mkdir()
            probe.rmdir()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses writes to this user")


def test_out_in_a_read_only_folder_is_refused(tmp_path):
    recipe = _recipe(tmp_path)
    folder = _unwritable_folder(tmp_path)
    try:
        _bad(_validate(recipe, "--out", str(folder / "run")), "cannot write in", str(folder))
        _bad(runner.invoke(app, ["run", str(recipe), "--out", str(folder / "run")]), "cannot write in")
        assert not (folder / "run").exists()
    finally:
        (tmp_path / "readonly").chmod(0o755)


# ----------------------------------------------------------------------- family 3: one line, exit 2, not a traceback


def test_one_column_csv_with_a_caption_header(tmp_path):
    (tmp_path / "m.csv").write_text("Caption\nthe first memorized caption\nthe second one\n")
    result = _validate(_recipe(tmp_path, memorized={"file": "m.csv"}))
    assert result.exit_code == 0, result.output
    assert "2 memorized" in result.stdout


@pytest.mark.parametrize("prompts,needle", [
    ([""], "inline prompt 1 is empty"),
    (["fine", "   "], "inline prompt 2 is empty or only whitespace"),
    ([{"prompt": " \t"}], "memorized.prompts.0.prompt: a prompt must have text"),
    ([None], "memorized.prompts.0"),
    ([{"prompt": {"a": 1}}], "memorized.prompts.0.prompt"),
])
def test_inline_prompts_must_be_text(tmp_path, prompts, needle):
    _bad(_validate(_recipe(tmp_path, memorized={"prompts": prompts})), needle)


@pytest.mark.parametrize("row,needle", [
    ({"caption": None}, "the prompt 'caption' is missing (null)"),
    ({"caption": {"text": "a cat"}}, "the prompt 'caption' is dict, not text"),
    ({"caption": 5}, "the prompt 'caption' is int, not text"),
    ({"caption": "  "}, "the prompt 'caption' is empty"),
    ({"caption": "a cat", "image": 5}, "the image 'image' is int, not a path"),
    ({"caption": "a cat", "image": ["a.png"]}, "the image 'image' is list, not a path"),
    ({"caption": "a cat", "variants": {"a": 1}}, "'variants' must be a list of strings"),
])
def test_jsonl_fields_of_the_wrong_type(tmp_path, row, needle):
    (tmp_path / "m.jsonl").write_text(json.dumps({"caption": "fine"}) + "\n" + json.dumps(row) + "\n")
    _bad(_validate(_recipe(tmp_path, memorized={"file": "m.jsonl", "image_field": "image"})), "row 2", needle)


def test_csv_row_without_its_caption_cell(tmp_path):
    (tmp_path / "m.csv").write_text("URL,Caption\nu1,a cat\nu2\n")
    _bad(_validate(_recipe(tmp_path, memorized={"file": "m.csv"})), "row 2", "missing")


def test_very_deep_json_line(tmp_path):
    (tmp_path / "m.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    _bad(_validate(_recipe(tmp_path, memorized={"file": "m.jsonl"})), "nested too deeply")


def test_very_deep_yaml_recipe(tmp_path):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    _bad(_validate(recipe), "deep.yaml")


def test_a_list_as_a_yaml_key(tmp_path):
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "? [a, b]\n: 1\n")
    _bad(_validate(recipe), "a key at line", "is a list")


def test_yaml_merge_keys_are_accepted_and_own_keys_override(tmp_path):
    recipe = _recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data.pop("detection")
    text = yaml.safe_dump(data, sort_keys=False)
    text += ("x-defaults: &defaults\n  threshold: 0.428\n  kernel_size: 7\n  betas: [0.5, 0.5]\n  n_seeds: 4\n"
             "detection:\n  <<: *defaults\n  n_seeds: 6\n")
    recipe.write_text(text)
    _bad(_validate(recipe), "unknown key 'x-defaults'")  # the anchor's own key is still checked...
    text = text.replace("x-defaults: &defaults\n  threshold: 0.428\n  kernel_size: 7\n  betas: [0.5, 0.5]\n"
                        "  n_seeds: 4\n", "")
    text = text.replace("  <<: *defaults\n", "  <<: &defaults {threshold: 0.428, kernel_size: 7, betas: [0.5, 0.5], "
                        "n_seeds: 4}\n")
    recipe.write_text(text)
    result = _validate(recipe)
    assert result.exit_code == 0, result.output
    from harden.recipe import load_recipe

    assert load_recipe(recipe).recipe.detection.n_seeds == 6  # the mapping's own key wins over the merged one
    recipe.write_text(text + "  n_seeds: 8\n")
    _bad(_validate(recipe), "duplicate key 'n_seeds'")  # a real duplicate is still one


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "model_index.json holds a JSON list, not an object"),
    ("\"text\"", "model_index.json holds a JSON str, not an object"),
    ("{not json", "model_index.json is not valid JSON"),
    ('{"unet": []}', "'unet' is not a [library, class] pair"),
    ('{"unet": ["diffusers", 5]}', "'unet' is not a [library, class] pair"),
])
def test_a_model_index_that_is_not_a_json_object(tmp_path, content, needle):
    model = _config_copy(tmp_path)
    (model / "model_index.json").write_text(content)
    recipe = _recipe(tmp_path, model={"id": str(model)})
    _bad(_validate(recipe), needle)
    _bad(runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out")]), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,needle", [
    ("{not json", "is damaged (JSONDecodeError)"),
    ("[]", "is not the run.json harden writes"),
    ('{"stages": {"calibrate": 1}}', "is not the run.json harden writes"),
    ("", "is damaged"),
])
def test_a_corrupt_run_json_on_resume(tmp_path, content, needle):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(content)
    _bad(runner.invoke(app, ["run", str(recipe), "--out", str(out), "--resume"]), "--resume", needle)
    assert (out / "run.json").read_text() == content and sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_the_cli_maps_each_known_failure_class_to_its_exit_code():
    """One place (cli.ui.known_failure): the classes harden knows get one line and their code; others are bugs."""
    cases = [
        (BadInputError("x"), 2), (KeyboardInterrupt(), 130), (Terminated(), 143),
        (PermissionError(13, "Permission denied", "/x"), 2), (OSError(28, "No space left on device", "/x"), 2),
        (OSError(30, "Read-only file system", "/x"), 2), (NotADirectoryError(20, "Not a directory", "/f/x"), 2),
        (RecursionError(), 2), (MemoryError(), 2),
    ]
    for err, code in cases:
        known = known_failure(err)
        assert known is not None and known.exit_code == code, err
        assert "\n" not in known.one_line()
    assert known_failure(Terminated()).signum == signal.SIGTERM
    for bug in (ValueError("x"), KeyError("x"), TypeError("x"), ZeroDivisionError()):
        assert known_failure(bug) is None  # exit 1 with its traceback: a bug to report


# ------------------------------------------------------------------------------------ family 7: strict types


@pytest.mark.parametrize("sections,needle", [
    ({"seed": True}, "seed: expected a number or text, not a boolean"),
    ({"detection": {"n_seeds": True}}, "detection.n_seeds: expected a number"),
    ({"verify": {"seeds": [0, True]}}, "verify.seeds: expected a number"),
    ({"detection": {"betas": [0.5, True]}}, "detection.betas"),
    ({"verify": {"gates": {"neurons_total": {"max": float("nan")}}}}, "neurons_total.max"),
    ({"verify": {"gates": {"neurons_total": {"min": float("inf")}}}}, "neurons_total.min"),
    ({"localization": {"theta_step": float("nan")}}, "localization.theta_step"),
])
def test_booleans_are_not_numbers_and_nan_is_not_a_bound(tmp_path, sections, needle):
    _bad(_validate(_recipe(tmp_path, **sections)), needle)


def test_booleans_stay_booleans_where_the_recipe_asks_for_one(tmp_path):
    result = _validate(_recipe(tmp_path, verify={"generate": True, "control": False},
                               memorized={"file": "m.jsonl", "where": {"memorized": True}}))
    assert result.exit_code == 2 and "m.jsonl does not exist" in result.stderr  # got past the schema
    (tmp_path / "m.jsonl").write_text('{"caption": "a", "memorized": true}\n{"caption": "b", "memorized": false}\n')
    result = _validate(_recipe(tmp_path, verify={"generate": True, "control": False},
                               memorized={"file": "m.jsonl", "where": {"memorized": True}}))
    assert result.exit_code == 0 and "1 memorized" in result.stdout


# --------------------------------------------------------------------------------------- family 3: the fuzzers

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), _TEXT)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_TEXT, inner, max_size=4)), max_leaves=10)
_SECTION_KEYS = {name: list(getattr(field.annotation, "model_fields", {}))
                 for name, field in Recipe.model_fields.items()}
_FUZZ = settings(max_examples=int(os.environ.get("HARDEN_FUZZ_EXAMPLES", "60")), deadline=None,  # 600: a deep run
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _exit_0_or_2(result):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    _recipe(folder)  # writes astronaut.png
    return folder


@_FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(_SECTION_KEYS)), st.one_of(st.none(), _TEXT), _VALUES,
                                st.booleans()), min_size=1, max_size=4), data=st.data())
def test_fuzzed_recipes_exit_0_or_2(fuzz_dir, edits, data):
    recipe = recipe_dict(**copy.deepcopy(ZOO))
    for section, key, value, delete in edits:
        if key is None or not isinstance(recipe.get(section), dict):
            target, field = recipe, section  # the section itself
        else:
            known = _SECTION_KEYS[section]
            field = data.draw(st.sampled_from(known)) if known and not key.startswith("x") else key
            target = recipe[section]
        if delete:
            target.pop(field, None)
        else:
            target[field] = value
    path = fuzz_dir / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    _exit_0_or_2(_validate(path))


_YAML_PIECES = st.sampled_from(["a: 1\n", "- x\n", "? [a]\n: 1\n", "b: &x {c: 1}\n", "d: *x\n", "<<: *x\n",
                                "e: !!python/object:os.system {}\n", "f: [\n", "g: {h: [1, 2]}\n", "'\n",
                                "seed: 1\nseed: 2\n", "model: {id: zoo:memorizer}\n", "\t\n", "i: !!binary AA==\n",
                                "j: 2001-01-01\n", "k: .nan\n", "<<: [*x, *x]\n", "%YAML 1.1\n---\n", "--- 1\n"])


@_FUZZ
@given(pieces=st.lists(st.one_of(_YAML_PIECES, _TEXT), max_size=8), raw=st.binary(max_size=40))
def test_fuzzed_yaml_text_exits_0_or_2(fuzz_dir, pieces, raw):
    path = fuzz_dir / "text.yaml"
    path.write_bytes("".join(pieces).encode() + raw)
    _exit_0_or_2(_validate(path))


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


_ROWS = st.one_of(
    st.dictionaries(st.sampled_from(["caption", "image", "variants", "memorized", "Caption"]), _VALUES, max_size=4),
    _VALUES)
_PROMPT_FILES = st.one_of(
    st.tuples(st.just(".txt"), _TEXT.map(str.encode) | st.binary(max_size=60)),
    st.tuples(st.just(".jsonl"), st.lists(_ROWS, max_size=4).map(
        lambda rows: "\n".join(json.dumps(r) for r in rows).encode())),
    st.tuples(st.just(".jsonl"), st.lists(_TEXT, max_size=4).map(lambda lines: "\n".join(lines).encode())),
    st.tuples(st.just(".csv"), st.lists(st.lists(_TEXT.filter(lambda t: "\x00" not in t), max_size=3),
                                        max_size=4).map(lambda rows: _csv_text(rows).encode())),
    st.tuples(st.just(".csv"), _TEXT.map(lambda t: ("Caption\n" + t).encode())),
)


@_FUZZ
@given(file=_PROMPT_FILES, field=st.sampled_from([None, "caption", "Caption", "image"]),
       image_field=st.sampled_from([None, "image", "caption"]), offset=st.integers(0, 3))
def test_fuzzed_prompt_files_exit_0_or_2(fuzz_dir, file, field, image_field, offset):
    suffix, content = file
    (fuzz_dir / f"prompts{suffix}").write_bytes(content)
    source = {"file": f"prompts{suffix}", "offset": offset}
    if suffix != ".txt":
        source.update({k: v for k, v in (("field", field), ("image_field", image_field)) if v})
    result = _validate(_recipe(fuzz_dir, "prompts.yaml", memorized=source))
    _exit_0_or_2(result)


def test_validate_never_writes(tmp_path):
    recipe = _recipe(tmp_path)
    before = sorted(os.listdir(tmp_path))
    result = _validate(recipe, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == before
