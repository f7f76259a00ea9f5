"""The study spec: defaults, forms of the budget, and one clear error per bad field."""

from __future__ import annotations

import pytest

from mpsearch.errors import MPSearchError, SpecError
from mpsearch.quant import Budget, Scheme
from mpsearch.spec import Spec

from conftest import DEFAULT_STUDY, write_spec


def test_default_study_loads_with_the_documented_settings():
    spec = Spec.load(DEFAULT_STUDY)
    assert spec.name == "minilm"
    assert spec.model.source == "minilm"
    assert spec.quant.bits == (2, 3, 4, 8, 16) and spec.quant.menu() == (2, 3, 4, 8, 16, "2a", "3a", "4a", "2g64a", "3g64a")
    assert spec.scheme == Scheme(group_size=128, symmetric=True, method="gptq", scale_dtype="float16", damp=0.1, act_order=True, clip="mse")
    assert spec.budget.to_budget() == Budget("bpw", 4.0)
    assert spec.storage.url == "sqlite:///mpsearch.db"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('budget = "4.0bpw"', Budget("bpw", 4.0)),
        ('budget = "5.2MiB"', Budget("mib", 5.2)),
        ("budget = 5000000", Budget("bytes", 5_000_000)),
        ("[budget]\nmib = 12", Budget("mib", 12.0)),
    ],
)
def test_budget_is_read_in_each_form(text, expected):
    assert Spec.from_toml(text).budget.to_budget() == expected


def test_name_defaults_to_the_file_stem_and_paths_resolve_beside_the_spec(tmp_path):
    (tmp_path / "lines.txt").write_text("one sentence\nanother sentence\n")
    path = write_spec(tmp_path, '[data]\nsource = "lines.txt"\n', name="my-study.toml")
    spec = Spec.load(path)
    assert spec.name == "my-study"
    assert spec.resolve(spec.data.source) == tmp_path / "lines.txt"


@pytest.mark.parametrize(
    "text, field, words",
    [
        ("[model]\nsorce = 'minilm'", "model.sorce", "unknown field"),
        ("colour = 'blue'", "colour", "unknown field"),
        ("[data]\nbatch_size = '32'", "data.batch_size", "expected an integer"),
        ("[quant]\nsymmetric = 1", "quant.symmetric", "expected true or false"),
        ("[quant]\nbits = [2, 4, 5]", "quant.bits", "5 bits are llama.cpp's Q5 types: set target.format = \"gguf\""),
        ("[target]\nimatrix = true", "target.imatrix", "set target.format = \"gguf\", or drop it"),
        ("[quant]\nbits = [1, 16]", "quant.bits", "1 is not a supported bit-width"),
        ("[quant]\nbits = []", "quant.bits", "non-empty"),
        ("[quant]\ngroup_size = 0", "quant.group_size", "-1"),
        ("[quant]\nmethod = 'awq'", "quant.method", "must be one of"),
        ("[quant]\nclip = 'minmax'", "quant.clip", "'none', 'mse' or 'weighted'"),
        ("[quant]\nclip = 'weighted'\nmethod = 'rtn'", "quant.clip", 'use quant.method = "gptq", or clip = "mse"'),
        ("[quant]\nclip = 'mse'\n[target]\nformat = 'gguf'", "quant.clip", "drop quant.clip, or use another target"),
        ("[budget]\nbpw = -1.0", "budget.bpw", "must be > 0"),
        ("[budget]\nbpw = 4.0\nmib = 3.0", "budget", "exactly one"),
        ("budget = '4 bits'", "budget", "cannot read"),
        ("[data]\ncalibration = 0", "data.calibration", "must be > 0"),
        ("[loss]\nkind = 'callable'", "loss", "loss.callable"),
        ("[loss]\nkind = 'callable'\ncallable = 'just_a_name'", "loss", 'must be "module:function"'),
        ("[model]\nsource = 'hf:no/such/dir'", "model.source", "does not exist"),
        ("[data]\nsource = 'missing.jsonl'", "data.source", "does not exist"),
        ("[search]\nstages = [0.5, 0.25, 1.0]", "search.stages", "must rise from above 0 to exactly 1.0"),
        ("[search]\nstages = [0.25, 0.5]", "search.stages", "must rise from above 0 to exactly 1.0"),
        ("[search]\nprofiles = []", "search.profiles", "one sensitivity method at least, each once"),
        ("[search]\nprofiles = ['hessian', 'hessian']", "search.profiles", "one sensitivity method at least, each once"),
        ("[search]\nscreen = 1", "search.screen", "must be >= 2, got 1"),
        ("[search]\npatience = 0", "search.patience", "must be > 0"),
        ("[sensitivity]\nmax_probes = 1", "sensitivity.max_probes", "must be >= 2, got 1"),
        ("[sensitivity]\ntol = 0", "sensitivity.tol", "must be > 0"),
        ("[export]\nrepair_examples = 0", "export.repair_examples", "must be > 0"),
        ("[export]\nrepair_lr = 0", "export.repair_lr", "must be > 0"),
        ("[export]\nrepair_schedule = 'linear'", "export.repair_schedule", "'constant' or 'cosine'"),
        ("[export]\nrefine = 'qat'", "export.refine", "'none', 'sequential' or 'blockwise'"),
        ("[export]\nblockwise_steps = 0", "export.blockwise_steps", "must be > 0"),
    ],
)
def test_each_bad_field_is_named_with_what_to_do(text, field, words):
    with pytest.raises(SpecError) as raised:
        Spec.from_toml(text)
    message = str(raised.value)
    assert message.startswith(f"{field}:"), message
    assert words in message
    assert "\n" not in message


def test_an_empty_data_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SpecError, match=r"^data.source: data file .*empty.txt' is empty"):
        Spec.load(write_spec(tmp_path, "[data]\nsource = 'empty.txt'\n"))


def test_a_missing_spec_and_bad_toml_say_what_to_do(tmp_path):
    with pytest.raises(MPSearchError, match="does not exist; pass a study TOML"):
        Spec.load(tmp_path / "nope.toml")
    with pytest.raises(MPSearchError, match=r"is not valid TOML: .*line 1"):
        Spec.load(write_spec(tmp_path, "[model\nsource = 'minilm'\n"))


def test_overrides_are_validated_like_the_file():
    spec = Spec.load(DEFAULT_STUDY)
    assert spec.with_overrides(budget="3.5bpw").budget.to_budget() == Budget("bpw", 3.5)
    with pytest.raises(SpecError, match="^data.batch_size:"):
        spec.with_overrides(data={"batch_size": -4})


def test_the_vllm_menu_is_the_widths_vllm_runs():
    spec = Spec.from_toml('[quant]\nbits = "vllm"\n')
    assert spec.quant.bits == (4, 8, 16) and spec.digest() == Spec.from_toml("[quant]\nbits = [4, 8, 16]\n").digest()
    with pytest.raises(SpecError, match="quant.bits: .*or \"vllm\""):
        Spec.from_toml('[quant]\nbits = "tensorrt"\n')



def test_every_study_shipped_in_studies_loads_with_its_target():
    studies = sorted(DEFAULT_STUDY.parent.glob("*.toml"))
    targets = {path.stem: Spec.load(path).target.format for path in studies}
    assert targets == {"minilm": "mpsearch", "minilm-ct": "compressed-tensors", "minilm-gguf": "gguf", "smollm2": "mpsearch"}
    # A target changes the study's digest: its bytes differ.
    minilm = Spec.load(DEFAULT_STUDY)
    assert minilm.digest() != minilm.with_overrides(target={"format": "compressed-tensors"}).digest()


def test_the_sensitivity_section_is_not_part_of_the_studys_digest():
    """It changes how the warm starts' profiles are measured (their stored keys), not the losses."""
    plain = Spec.from_toml("")
    bounded = Spec.from_toml("[sensitivity]\nmax_probes = 12\ntol = 0.1\n")
    assert bounded.sensitivity.max_probes == 12 and plain.sensitivity.max_probes == 48 and plain.sensitivity.tol == 0.05
    assert bounded.digest() == plain.digest()


def test_clip_is_a_later_field_that_counts_only_when_set():
    """A study made before ``quant.clip`` keeps its digest, and its banks their keys; ``mse`` is a new study."""
    plain = Spec.from_toml("")
    assert plain.digest() == Spec.from_toml('[quant]\nclip = "none"\n').digest()
    clipped = Spec.from_toml('[quant]\nclip = "mse"\n')
    assert clipped.digest() != plain.digest() and clipped.quant.to_scheme().clip == "mse"
    assert "clip" not in plain.quant.to_scheme().to_dict() and clipped.quant.to_scheme().to_dict()["clip"] == "mse"
    weighted = Spec.from_toml('[quant]\nmethod = "gptq"\nclip = "weighted"\n')
    assert weighted.digest() not in (plain.digest(), clipped.digest()) and weighted.quant.to_scheme().to_dict()["clip"] == "weighted"
