"""VinDr-CXR is the default vocabulary, and nothing about it changed when vocabularies moved into the data.

`tests/data/vindr_before_vocabulary.json` was written by litegpt at commit 4f7aa98, before vocabularies
existed (its commit message says how). This test rebuilds the same two synthetic sets (PhysioNet and
Kaggle layouts) with today's code and compares: the shard files byte for byte (their sha256), the
manifest (apart from what was added: the vocabulary, the template and source.format), every rendered
answer, the prompts, the parse of tricky strings, the metrics, and the tiny tokenizer's training text.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from litegpt.data.prepare import PrepareConfig, prepare
from litegpt.data.shards import iter_json
from litegpt.data.synth import synthesize
from litegpt.eval.metrics import Prediction, compute_metrics
from litegpt.grammar import TASKS, Grammar
from litegpt.labels import VINDR_CXR
from litegpt.model.tiny import tokenizer_corpus

BEFORE = json.loads((Path(__file__).parent / "data/vindr_before_vocabulary.json").read_text())
LAYOUTS = {"physionet": 3, "kaggle": 5}  # layout -> synth seed, as recorded


def plain(value):
    return json.loads(json.dumps(value, default=list))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> dict:
    """The recorded sets made again with today's code: {layout: (manifest, sample metas)}."""
    work = tmp_path_factory.mktemp("vindr-unchanged")
    out = {}
    for layout, seed in LAYOUTS.items():
        root = synthesize(work / f"{layout}-root", 14, 6, seed=seed, layout=layout, max_side_px=320, progress=False,
                          workers=1)
        manifest = prepare(PrepareConfig(root=root, out=work / f"{layout}-shards", samples_per_shard=6, workers=1))
        metas = [m for s in manifest["shards"] for m in iter_json(work / f"{layout}-shards" / s["name"])]
        out[layout] = (manifest, metas)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shards_and_manifest_are_as_before(rebuilt, layout):
    manifest, _ = rebuilt[layout]
    assert manifest["vocabulary"] == VINDR_CXR.to_dict() and manifest["source"]["format"] == "vindr"
    assert Grammar.from_record(manifest).to_dict() == Grammar(VINDR_CXR).to_dict()
    now = {k: v for k, v in manifest.items() if k not in ("litegpt_version", "inputs_sha256", "vocabulary", "template")}
    now["source"] = {k: v for k, v in manifest["source"].items() if k not in ("root", "format")}
    assert plain(now) == BEFORE[layout]["manifest"]  # includes every shard's sha256: the same bytes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_texts_and_metrics_are_as_before(rebuilt, layout):
    grammar = Grammar.from_record(rebuilt[layout][0])
    metas = rebuilt[layout][1]
    texts = [{"image_id": m["image_id"], **{t: grammar.answer(t, m) for t in TASKS}} for m in metas]
    assert texts == BEFORE[layout]["texts"]
    rng = random.Random(LAYOUTS[layout])  # the recorded mix of right and wrong answers, drawn the same way
    predictions = []
    for meta, answers in zip(metas, texts):
        for task in TASKS:
            other = grammar.answer(task, metas[rng.randrange(len(metas))])
            output = answers[task] if rng.random() < 0.5 else other
            predictions.append(Prediction(meta["image_id"], task, output, answers[task], meta["findings"],
                                          meta["diagnoses"]))
    assert plain(compute_metrics(predictions, grammar, text=False)) == BEFORE[layout]["metrics"]


def test_prompts_parses_and_tokenizer_text_are_as_before():
    grammar = Grammar(VINDR_CXR)
    assert [grammar.prompt(t) for t in TASKS] + [grammar.prompt("identify", "[grounding]")] == BEFORE["prompts"]
    assert {text: plain(grammar.parse(text).__dict__) for text in BEFORE["parses"]} == BEFORE["parses"]
    assert hashlib.sha256("\n".join(tokenizer_corpus()).encode()).hexdigest() == BEFORE["tokenizer_corpus_sha256"]
