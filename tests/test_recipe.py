"""Recipes: strict schema, one-line errors with suggestions, duplicate keys, path resolution, prompt sources."""

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from planted_model import recipe_dict

from harden.errors import BadInputError
from harden.prompts import fetch, load_prompts, prompts_sha256
from harden.recipe import PromptSource, load_recipe, parse_recipe, resolve_model_path
from harden.stages.context import load_inputs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, data, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _error(tmp_path, data) -> str:
    with pytest.raises(BadInputError) as err:
        load_recipe(_write(tmp_path, data))
    assert err.value.exit_code == 2
    line = err.value.one_line()
    assert "\n" not in line
    return line


def test_defaults_are_the_official_nemo_settings(tmp_path):
    r = load_recipe(_write(tmp_path, recipe_dict(detection=None, localization=None, export=None))).recipe
    d = r.detection
    assert (d.n_seeds, d.seed, d.kernel_size, d.timestep_index) == (10, 1, 11, 1)
    assert r.detection.betas == (0.33, 0.33, 0.33) and r.detection.threshold == "tau_mem"
    loc = r.localization
    assert (loc.theta_start, loc.theta_step, loc.theta_min, loc.k_start, loc.k_max) == (5.0, 0.25, 1.0, 0, 1280)
    assert loc.mode == "exact" and loc.rel_threshold is None and loc.factor == 0.0
    assert r.model.allow_pickle is False and r.export.layout == "compact"


@pytest.mark.parametrize("section,bad,expected", [
    ("model", {"id": "m", "revison": "main"}, "unknown key 'model.revison'; did you mean 'revision'?"),
    ("detection", {"treshold": 0.4}, "unknown key 'detection.treshold'; did you mean 'threshold'?"),
    ("verify", {"gates": {"heldout_ssim_median": {"mn": 0.8}}}, "did you mean 'min'?"),
    ("verify", {"gates": {"heldout_ssim_medain": {"min": 0.8}}}, "did you mean 'heldout_ssim_median'?"),
    ("memorized", {"prompts": [{"prompt": "a", "imge": "x.png"}]}, "did you mean 'image'?"),
])
def test_unknown_keys_are_named_with_the_nearest_valid_key(tmp_path, section, bad, expected):
    assert expected in _error(tmp_path, recipe_dict(**{section: None}) | {section: bad})


def test_unknown_top_level_section(tmp_path):
    line = _error(tmp_path, recipe_dict() | {"verfy": {}})
    assert "unknown key 'verfy'; did you mean 'verify'?" in line


def test_duplicate_keys_are_an_error_with_both_lines(tmp_path):
    text = "model:\n  id: m\nmemorized:\n  prompts: [a]\nreference:\n  prompts: [b, c]\nmodel:\n  id: n\n"
    line = _error(tmp_path, text)
    assert "duplicate key 'model' at line 7 (first at line 1)" in line
    nested = ("model:\n  id: m\n  dtype: float32\n  dtype: float16\n"
              "memorized: {prompts: [a]}\nreference: {prompts: [b, c]}\n")
    assert "duplicate key 'dtype' at line 4" in _error(tmp_path, nested)


@pytest.mark.parametrize("section,bad,expected", [
    ("detection", {"threshold": 1.5}, "detection.threshold"),
    ("detection", {"threshold": 0}, "(0, 1]"),
    ("localization", {"tau_refine": -0.1}, "localization.tau_refine"),
    ("detection", {"kernel_size": 8}, "kernel_size must be odd"),
    ("detection", {"n_seeds": 1}, "detection.n_seeds"),
    ("localization", {"theta_start": 0.5}, "theta_start must be >= theta_min"),
    ("localization", {"factor": 1.5}, "localization.factor"),
    ("verify", {"seeds": []}, "verify.seeds"),
    ("export", {"layout": "tiny"}, "'compact', 'dense' or 'both'"),
    ("model", {"id": "m", "device": "gpu"}, "device must be auto, cpu"),
    ("hub", {"repo_id": "no slash"}, "hub.repo_id"),
    ("memorized", {"file": "https://example.org/p.txt"}, "needs its 'sha256'"),
    ("memorized", {"prompts": ["a"], "file": "p.txt"}, "exactly one of 'prompts'"),
])
def test_values_are_range_checked(tmp_path, section, bad, expected):
    data = recipe_dict()
    data[section] = bad
    assert expected in _error(tmp_path, data)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    assert "invalid YAML at line" in _error(tmp_path, "model: [unclosed\n")
    assert "missing required key 'reference'" in _error(tmp_path, recipe_dict(reference=None))


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "sub" / "model").mkdir(parents=True)
    (tmp_path / "sub" / "prompts.txt").write_text("first\n\n  second  \n")
    path = _write(tmp_path / "sub", recipe_dict() | {"memorized": {"file": "prompts.txt"}})
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    loaded = load_recipe(path)
    assert resolve_model_path("model", loaded.folder) == tmp_path / "sub" / "model"
    assert resolve_model_path("org/name", loaded.folder) is None  # a Hub id
    with pytest.raises(BadInputError, match="does not exist"):
        resolve_model_path("./missing", loaded.folder)
    inputs = load_inputs(loaded)
    assert [p.text for p in inputs.memorized] == ["first", "second"]


def test_prompt_file_formats_and_filters(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"caption": "x", "memorized": true, "image": "i.png"}\n'
                                      '{"caption": "y", "memorized": false}\n{"caption": "z", "memorized": true}\n')
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")  # reference images are opened when prompts load
    (tmp_path / "b.csv").write_text(';Caption;URL\n0;"one; with semicolon";u\n1;two;v\n')
    got = load_prompts(PromptSource(file="a.jsonl", where={"memorized": True}, image_field="image"), tmp_path, "m")
    assert [(p.text, p.image) for p in got] == [("x", tmp_path / "i.png"), ("z", None)]
    csv = load_prompts(PromptSource(file="b.csv"), tmp_path, "m")
    assert [p.text for p in csv] == ["one; with semicolon", "two"]
    assert [p.text for p in load_prompts(PromptSource(file="b.csv", offset=1), tmp_path, "m")] == ["two"]
    assert [p.text for p in load_prompts(PromptSource(prompts=["p", "q", "r"], limit=2), tmp_path, "m")] == ["p", "q"]


@pytest.mark.parametrize("content,name,expected", [
    ("", "empty.txt", "no prompts left"),
    ("\n\n", "blank.txt", "no prompts left"),
    ('{"text": "x"}\n', "k.jsonl", "row 1 has no 'caption'"),
    ("{not json\n", "j.jsonl", "line 1 is not JSON"),
    ("a,b\n1,2\n", "c.csv", "has no 'Caption'"),
    ("x\n", "p.parquet", "unsupported prompt file type"),
])
def test_bad_prompt_files(tmp_path, content, name, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(BadInputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(PromptSource(file=name), tmp_path, "memorized")
    with pytest.raises(BadInputError, match="does not exist"):
        load_prompts(PromptSource(file="missing.txt"), tmp_path, "memorized")


@pytest.fixture
def http_files(tmp_path):
    """A local HTTP server over a folder (standard library), counting requests."""
    root = tmp_path / "www"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_url_prompt_files_are_verified_and_cached(tmp_path, http_files, monkeypatch):
    root, base, hits = http_files
    monkeypatch.setenv("HARDEN_CACHE", str(tmp_path / "cache"))
    data = b"alpha\nbeta\n"
    (root / "p.txt").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    source = PromptSource(file=f"{base}/p.txt", sha256=sha)
    assert [p.text for p in load_prompts(source, tmp_path, "m")] == ["alpha", "beta"]
    assert [p.text for p in load_prompts(source, tmp_path, "m")] == ["alpha", "beta"]
    assert hits == ["/p.txt"]  # fetched once, then served from the cache
    with pytest.raises(BadInputError, match="has sha256"):
        fetch(f"{base}/p.txt", "0" * 64)
    with pytest.raises(BadInputError, match="could not fetch"):
        fetch(f"{base}/missing.txt", "1" * 64)


@pytest.mark.skipif(not (SHARED / "sdv1_500_memorized.jsonl").is_file(),
                    reason=f"needs Wen et al.'s prompt set in {SHARED} (the repository does not ship it: no license)")
def test_sd_v1_4_recipe_validates_with_the_shared_prompt_set(tmp_path, monkeypatch):
    """The shipped recipe names Wen et al.'s 500 prompts by URL + sha256; a cache seeded from ../shared serves it."""
    recipe = load_recipe(REPO / "recipes" / "sd-v1-4.yaml")
    monkeypatch.setenv("HARDEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("no network in tests"))
    for section, name in ((recipe.recipe.memorized, "sdv1_500_memorized.jsonl"),
                          (recipe.recipe.reference, "group_nomem500.txt")):
        target = tmp_path / "cache" / "prompts" / section.sha256 / section.file.rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True)
        shutil.copy(SHARED / name, target)
    inputs = load_inputs(recipe)
    assert len(inputs.memorized) == 500 and inputs.memorized[0].text
    assert recipe.recipe.model.id == "CompVis/stable-diffusion-v1-4" and recipe.recipe.detection.kernel_size == 11
    assert len(inputs.references) + len(inputs.held_out) == 500 and not set(
        p.text for p in inputs.references) & set(p.text for p in inputs.held_out)
    assert prompts_sha256(inputs.memorized) == prompts_sha256(load_prompts(
        PromptSource(file=str(SHARED / "sdv1_500_memorized.jsonl")), tmp_path, "m"))


def test_gates_that_the_recipe_cannot_measure_are_refused_before_running(tmp_path):
    data = recipe_dict(verify={"held_out": None, "gates": {"heldout_ssim_median": {"min": 0.8}}})
    data["verify"].pop("held_out")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "astronaut.png")
    with pytest.raises(BadInputError, match="cannot be measured"):
        load_inputs(load_recipe(_write(tmp_path, data)))


def test_parse_recipe_rejects_non_mappings():
    with pytest.raises(BadInputError, match="YAML mapping"):
        parse_recipe(["a"])
    assert json.loads(json.dumps(parse_recipe(recipe_dict()).model_dump(mode="json")))["seed"] == 0


def test_zoo_ids_point_inside_the_package(tmp_path):
    from harden.recipe import package_path

    zoo = REPO / "harden" / "zoo"
    assert resolve_model_path("zoo:alignment.py", tmp_path) == zoo / "alignment.py"
    for bad in ("zoo:../recipe.py", "zoo:no-such-model"):
        with pytest.raises(BadInputError, match="not in harden's zoo"):
            package_path(bad)
