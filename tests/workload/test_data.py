"""Data sources and the calibration/evaluation split."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mpsearch.errors import WorkloadError
from mpsearch.spec import Spec
from mpsearch.workload.data import split
from mpsearch.workload import stdlib_docs
from mpsearch.workload.stdlib_docs import stdlib_sentences

from conftest import write_spec


def _split(spec: Spec):
    return split(spec.data, spec.resolve)


def test_stdlib_docs_is_english_prose_and_the_same_every_time():
    sentences = stdlib_sentences()
    assert len(sentences) > 3000
    assert len(set(sentences)) == len(sentences)
    assert list(sentences) == sorted(sentences)
    words = sum(len(s.split()) for s in sentences) / len(sentences)
    assert 8 < words < 30
    assert not any(">>>" in s or s.startswith(("def ", "import ")) for s in sentences)
    stdlib_sentences.cache_clear()
    assert stdlib_sentences() == sentences


def _forget_the_corpus():
    for cached in (stdlib_docs.stdlib_sentences, stdlib_docs.stdlib_paragraphs, stdlib_docs._prose_paragraphs):
        cached.cache_clear()


def test_the_parsed_corpus_is_cached_on_disk_and_a_broken_cache_is_parsed_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MPSEARCH_CACHE_DIR", str(tmp_path))
    _forget_the_corpus()
    sentences, paragraphs = stdlib_docs.stdlib_sentences(), stdlib_docs.stdlib_paragraphs()
    (cache,) = (tmp_path / "corpora").glob("stdlib-*.json")
    assert not list((tmp_path / "corpora").glob(".*.tmp"))  # renamed into place, nothing left over

    # The next process reads the file and parses nothing.
    _forget_the_corpus()
    with monkeypatch.context() as m:
        m.setattr(stdlib_docs, "_docstrings", lambda path: pytest.fail("parsed a source file despite the cache"))
        assert stdlib_docs.stdlib_sentences() == sentences and stdlib_docs.stdlib_paragraphs() == paragraphs

    # A cut-short cache is named in a warning, parsed again, and written whole again.
    cache.write_text(cache.read_text()[: 1000])
    _forget_the_corpus()
    with caplog.at_level("WARNING", logger=stdlib_docs.__name__):
        assert stdlib_docs.stdlib_sentences() == sentences and stdlib_docs.stdlib_paragraphs() == paragraphs
    assert cache.name in caplog.text and str(tmp_path) not in caplog.text
    assert len(json.loads(cache.read_text())) == len(stdlib_docs._prose_paragraphs())

    # An empty MPSEARCH_CACHE_DIR turns the disk cache off.
    monkeypatch.setenv("MPSEARCH_CACHE_DIR", "")
    _forget_the_corpus()
    assert stdlib_docs._cache_file([]) is None and stdlib_docs.stdlib_sentences() == sentences
    _forget_the_corpus()


def test_stdlib_split_is_seeded_and_its_three_parts_never_meet():
    spec = Spec.from_toml("[data]\ncalibration = 300\nevaluation = 200")
    cal, ev, test = _split(spec)
    assert (len(cal), len(ev), len(test)) == (300, 200, 200)  # test: as many as evaluation by default
    assert not set(cal.texts) & set(ev.texts) and not set(cal.texts) & set(test.texts) and not set(ev.texts) & set(test.texts)
    again_cal, again_ev, again_test = _split(spec)
    assert again_cal.texts == cal.texts and again_ev.texts == ev.texts and again_test.texts == test.texts
    other_cal, _, _ = _split(spec.with_overrides(data={"calibration": 300, "evaluation": 200, "seed": 1}))
    assert other_cal.texts != cal.texts
    # The held-out sets stay put when only the calibration size changes.
    _, same_ev, same_test = _split(spec.with_overrides(data={"calibration": 50, "evaluation": 200}))
    assert same_ev.texts == ev.texts and same_test.texts == test.texts
    assert len(_split(spec.with_overrides(data={"calibration": 300, "evaluation": 200, "test": 64}))[2]) == 64


def test_asking_for_more_examples_than_exist_is_an_error():
    spec = Spec.from_toml("[data]\ncalibration = 5000\nevaluation = 5000")
    with pytest.raises(WorkloadError, match=r"data.calibration \+ data.evaluation \+ data.test = 10000 but 'stdlib-docs' has \d+ examples"):
        _split(spec)
    spec = Spec.from_toml("[data]\ncalibration = 1000\nevaluation = 1000\ntest = 5000")  # a test size asked for is not cut
    with pytest.raises(WorkloadError, match=r"data.test = 7000 but"):
        _split(spec)


def test_text_file_one_example_per_line(tmp_path):
    (tmp_path / "lines.txt").write_text("".join(f"example number {i}\n\n" for i in range(10)))
    spec = Spec.load(write_spec(tmp_path, "[data]\nsource = 'lines.txt'\ncalibration = 4\nevaluation = 6\n"))
    cal, ev, test = _split(spec)
    assert sorted(cal.texts + ev.texts) == sorted(f"example number {i}" for i in range(10))
    assert len(test) == 0  # nothing left for a test split: the search reports no test losses


def test_jsonl_with_text_and_labels_and_a_separate_eval_file(tmp_path):
    rows = [{"sentence": f"text {i}", "y": i % 3} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]))
    spec = Spec.load(write_spec(tmp_path, """
        [data]
        source = "train.jsonl"
        eval_source = "test.jsonl"
        text_field = "sentence"
        label_field = "y"
        calibration = 12
        evaluation = 5
    """))
    cal, ev, _ = _split(spec)
    assert sorted(cal.texts) == sorted(r["sentence"] for r in rows)
    assert sorted(ev.texts) == [f"text {i}" for i in range(5)]
    assert [int(y) for y in ev.labels] == [int(t.split()[1]) % 3 for t in ev.texts]


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"text": "ok"}\n{"text": oops}\n', "line 2 of .* is not valid JSON"),
        ('{"body": "no text field"}\n', "line 1 of .* has no string field 'text'"),
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', "some records have 'label' and some do not"),
        ("\n\n   \n", "holds no examples"),
    ],
)
def test_bad_jsonl_is_reported_by_line(tmp_path, content, words):
    (tmp_path / "d.jsonl").write_text(content)
    spec = Spec.load(write_spec(tmp_path, "[data]\nsource = 'd.jsonl'\ncalibration = 1\nevaluation = 1\n"))
    with pytest.raises(WorkloadError, match=f"^data.source: .*{words}"):
        _split(spec)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tensor_files_split_along_the_first_dimension(tmp_path, suffix):
    tensors = {"inputs": torch.arange(40.0).reshape(20, 2), "labels": torch.arange(20) % 2}
    path = tmp_path / f"data{suffix}"
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    spec = Spec.load(write_spec(tmp_path, f"[data]\nsource = 'data{suffix}'\ncalibration = 8\nevaluation = 12\n"))
    cal, ev, _ = _split(spec)
    rows = torch.cat([cal.tensors["inputs"], ev.tensors["inputs"]])[:, 0].tolist()
    assert sorted(rows) == list(range(0, 40, 2))
    assert torch.equal(ev.labels, (ev.tensors["inputs"][:, 0] / 2).long() % 2)


def test_a_corrupt_tensor_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01not a tensor file")
    spec = Spec.load(write_spec(tmp_path, "[data]\nsource = 'bad.safetensors'\n"))
    with pytest.raises(WorkloadError, match="is not a readable tensor file"):
        _split(spec)
