"""`litegpt evaluate` on a real export (the session's tiny model) over real shards (`litegpt synth` + `prepare`).

The model is random, so what is checked is plumbing and contracts: one record per sample and task with the
shard's ground truth, metrics.json equal to an independent recomputation from predictions.jsonl, report,
overlays and TensorBoard present, greedy and seeded sampling repeatable, 2 ranks = 1 rank, box
confidences against a hand computation on the tiny tokenizer's own offsets, and the export's label
vocabulary (another than VinDr-CXR's) used throughout and required of the shard set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from litegpt.cli import main
from litegpt.data.shards import MANIFEST, Sample, iter_json, iter_tar, read_manifest, write_shard
from litegpt.eval.evaluate import chunk_sizes, merge_parts
from litegpt.eval.inference import box_scores, token_offsets
from litegpt.eval.metrics import Prediction, compute_metrics, read_predictions
from litegpt.files import write_json_atomic
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR, Vocabulary
from litegpt.model.export import save_export
from litegpt.model.model import Generation

REPO = Path(__file__).resolve().parent.parent
LIMIT, BATCH, STEP = 6, 4, 7
TASKS = ("identify", "vqa")
VINDR = Grammar(VINDR_CXR)
TOY = Grammar(Vocabulary.build("toy", ["Mass", "Effusion"], ["Fibrosis"]))


@pytest.fixture(scope="module")
def stage(tiny_model, tmp_path_factory) -> Path:
    """A stage directory holding a real export of the tiny model, trained (nominally) on both tasks."""
    directory = tmp_path_factory.mktemp("run") / "stage1"
    save_export(tiny_model, directory / "export", {"stage": "stage1", "step": STEP, "tasks": list(TASKS)})
    return directory


@pytest.fixture(scope="module")
def shards(prepared, tiny_config, tmp_path_factory) -> Path:
    """A private copy of the session shards with a feature cache for the tiny encoders (the preferred path)."""
    from litegpt.features import build_cache

    out = tmp_path_factory.mktemp("eval-shards") / "synth"
    shutil.copytree(prepared, out, ignore=shutil.ignore_patterns("features"))
    build_cache(out, tiny_config.vision, workers=1, progress=False)
    return out


def evaluate(stage: Path, shards: Path, *extra: str) -> int:
    return main(["evaluate", "--run", str(stage), "--shards", str(shards), "--limit", str(LIMIT),
                 "--batch-size", str(BATCH), *extra])


@pytest.fixture(scope="module")
def evaluated(stage, shards, one_thread) -> Path:
    assert evaluate(stage, shards) == 0
    return stage / "eval"


def test_one_record_per_sample_and_task_with_the_shards_ground_truth(evaluated, shards):
    manifest = read_manifest(shards)
    metas = [m for s in manifest["shards"] if s["split"] == "test" for m in iter_json(shards / s["name"])][:LIMIT]
    records = read_predictions(evaluated / "predictions.jsonl")
    assert len(records) == LIMIT * len(TASKS)
    assert {(r.image_id, r.task) for r in records} == {(m["image_id"], t) for m in metas for t in TASKS}
    by_id = {m["image_id"]: m for m in metas}
    for r in records:
        meta = by_id[r.image_id]
        assert r.gt_findings == [{"label": f["label"], "box": f["box"]} for f in meta["findings"]]
        assert r.gt_diagnoses == meta["diagnoses"]
        assert r.target == VINDR.answer(r.task, meta)
        assert r.token_probs and all(0 < p <= 1 for p in r.token_probs)
        assert r.box_scores is not None and len(r.box_scores) == len(VINDR.parse(r.output).findings)
    assert any(r.gt_findings for r in records)  # the check above saw real boxes


def test_metrics_json_equals_a_recomputation_from_predictions(evaluated):
    written = json.loads((evaluated / "metrics.json").read_text())
    recomputed = compute_metrics(read_predictions(evaluated / "predictions.jsonl"), VINDR)
    assert written == json.loads(json.dumps(recomputed))
    assert written["counts"]["records"] == LIMIT * len(TASKS)
    settings = json.loads((evaluated / "settings.json").read_text())
    assert (settings["samples"], settings["tasks"], settings["world_size"]) == (LIMIT, list(TASKS), 1)
    assert settings["source"].startswith("feature cache")
    assert not (evaluated / "parts").exists()


def test_report_overlays_and_tensorboard(evaluated, stage):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = (evaluated / "report.md").read_text()
    assert "Table 1." in report and "Table 3." in report
    overlays = sorted((evaluated / "overlays").glob("*.png"))
    records = [r for r in read_predictions(evaluated / "predictions.jsonl") if r.task == "identify"]
    assert len(overlays) == sum(bool(r.gt_findings or VINDR.parse(r.output).findings) for r in records) > 0
    for path in overlays:
        assert Image.open(path).mode == "RGB"
        assert f"](overlays/{path.name})" in report
    metrics = json.loads((evaluated / "metrics.json").read_text())
    events = EventAccumulator(str(stage / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    points = [(p.step, p.value) for p in events.Scalars("eval/parse/all_rate")]
    assert (STEP, pytest.approx(metrics["parse"]["all"]["rate"])) in points
    assert events.Tags()["images"]


def test_prints_the_metrics_table_and_paths(stage, shards, evaluated, one_thread, capsys, tmp_path):
    assert evaluate(stage, shards, "--out", str(tmp_path / "again")) == 0
    out = capsys.readouterr().out
    for row in ("local labels micro-F1", "Acc@0.3", "Acc@0.5", "box F1@0.5", "mAP@0.4", "parse rate"):
        assert row in out
    assert str(tmp_path / "again" / "predictions.jsonl") in out
    # Greedy twice gives the same bytes, and so do live encoders on the PNGs instead of the cache.
    first = (evaluated / "predictions.jsonl").read_bytes()
    assert (tmp_path / "again" / "predictions.jsonl").read_bytes() == first
    assert evaluate(stage, shards, "--out", str(tmp_path / "live"), "--features", "live") == 0
    assert (tmp_path / "live" / "predictions.jsonl").read_bytes() == first
    assert json.loads((tmp_path / "live" / "settings.json").read_text())["source"].startswith("live encoders")


def test_authors_preset_is_reproducible_with_its_seed(stage, shards, evaluated, tmp_path):
    runs = []
    for name in ("a", "b"):
        args = ["--decoding", "authors", "--seed", "3", "--tasks", "vqa", "--out", str(tmp_path / name)]
        assert evaluate(stage, shards, *args) == 0
        runs.append(read_predictions(tmp_path / name / "predictions.jsonl"))
    assert runs[0] == runs[1]
    greedy = [r for r in read_predictions(evaluated / "predictions.jsonl") if r.task == "vqa"]
    # it did sample: true unless all 6 sampled answers equal the greedy ones; on the random tiny model an
    # authors-preset sample equalled the greedy answer in 0 of 30 (64 tokens each), so no CPU's rounding decides it
    assert [r.output for r in runs[0]] != [r.output for r in greedy]
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())["decoding"]
    assert (settings["mode"], settings["temperature"], settings["top_p"], settings["top_k"],
            settings["max_new_tokens"]) == ("authors", 0.6, 0.9, 50, 512)


def test_authors_preset_honours_its_token_budget(tiny_model):
    """With EOS suppressed every sampled answer runs to exactly the preset's 512 new tokens: the budget is
    what the code guarantees, however long a given model's answers happen to be."""
    from PIL import Image

    from litegpt.eval.inference import PRESETS
    from litegpt.model.config import Visual

    decoding = PRESETS["authors"]
    visual = [tiny_model.vision.preprocess(Image.new("L", (64, 64), shade)) for shade in (40, 200)]
    batch = tiny_model.inputs.generation_batch(["a", "b"], [VINDR.prompt("vqa")] * 2, visual, Visual.LIVE)
    decoding.seed_batch(0, "vqa")
    generations = tiny_model.generate(batch, decoding.max_new_tokens, **decoding.generate_kwargs(),
                                      suppress_tokens=[tiny_model.inputs.eos])
    assert [len(g.token_ids) for g in generations] == [512, 512]


def test_two_ranks_give_the_same_predictions_as_one(stage, shards, evaluated, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "--", "litegpt.cli", "evaluate",
               "--run", str(stage), "--shards", str(shards), "--limit", str(LIMIT), "--batch-size", str(BATCH),
               "--out", str(tmp_path / "two")]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["world_size"] == 2
    one = (evaluated / "predictions.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()
    assert two == one  # same records (a set would do) and, by construction, the same order


def test_merge_restores_chunk_order():
    sizes = chunk_sizes(10, 3)  # chunks of 3, 3, 3, 1 on 3 ranks: rank 0 has chunks 0 and 3
    assert sizes == [3, 3, 3, 1]
    tag = lambda c, i: Prediction(f"c{c}i{i}", "vqa", "", "")
    parts = [[tag(c, i) for c, n in enumerate(sizes) if c % 3 == r for i in range(n)] for r in range(3)]
    merged = merge_parts(parts, sizes, tasks=1)
    assert [p.image_id for p in merged] == [f"c{c}i{i}" for c, n in enumerate(sizes) for i in range(n)]
    with pytest.raises(RuntimeError, match="expected"):
        merge_parts(parts[:2] + [[]], sizes, tasks=1)


def test_box_scores_match_a_hand_computation(tiny_model):
    tokenizer = tiny_model.tokenizer
    text = ("Local diseases of this chest radiograph are <p>Cardiomegaly</p> {<38><49><82><63>},"
            "<p>Nodule/Mass</p> {<1><2><3><4>}, é€ {<5><6><7><8>}.")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, reference = encoded["input_ids"], encoded["offset_mapping"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    probs = [(i + 1) / (len(ids) + 1) for i in range(len(ids))]
    generation = Generation(text, ids, tokenizer.convert_ids_to_tokens(ids), probs)
    # By hand: each box's text located with str.index, its tokens from the tokenizer's own offset mapping.
    expected = []
    for box in ("{<38><49><82><63>}", "{<1><2><3><4>}"):
        start = text.index(box)
        end = start + len(box)
        overlapping = [p for p, (s, e) in zip(probs, reference) if s < end and e > start]
        expected.append(sum(overlapping) / len(overlapping))
    assert len(VINDR.parse(text).findings) == 2  # the third box follows no <p> entry: unparsed, not scored
    assert box_scores(tokenizer, generation, VINDR) == pytest.approx(expected)
    offsets = token_offsets(tokenizer, ids, text)
    ascii_tokens = sum(end <= text.index("é") for _, end in reference)
    assert offsets[:ascii_tokens] == [tuple(r) for r in reference[:ascii_tokens]]
    pieces = "".join(text[s:e] for s, e in offsets)
    assert pieces == text  # spans tile the text; the multi-byte characters go to the tokens completing them


def test_clear_errors(stage, shards, tmp_path, capsys):
    assert main(["evaluate", "--run", str(stage.parent), "--shards", str(shards)]) == 1
    assert f"--run {stage}" in capsys.readouterr().err  # a run directory: says which stage to pass
    (tmp_path / "stage2").mkdir()
    assert main(["evaluate", "--run", str(tmp_path / "stage2"), "--shards", str(shards)]) == 1
    assert "train it first" in capsys.readouterr().err
    assert evaluate(stage, shards, "--split", "val") == 1
    assert "no 'val' split (its splits: test, train)" in capsys.readouterr().err
    assert evaluate(stage, tmp_path) == 1
    assert "manifest.json" in capsys.readouterr().err
    assert evaluate(stage, shards, "--features", "cache", "--tasks", "caption") == 1
    assert "unknown task" in capsys.readouterr().err
    assert evaluate(stage, shards, "--temperature", "0.5") == 1
    assert "--decoding sample or authors" in capsys.readouterr().err


# ---- another label vocabulary -------------------------------------------------------------------------------

RELABEL = {"Cardiomegaly": "Mass", "COPD": "Fibrosis"}  # write_tiny_shards' labels -> TOY's


def relabelled(source: Path, out: Path, grammar: Grammar) -> Path:
    """A copy of a tiny shard set in TOY's labels, its manifest recording `grammar` (as prepare writes it)."""
    manifest = read_manifest(source)
    out.mkdir(parents=True)
    for shard in manifest["shards"]:
        samples = []
        for sample in iter_tar(source / shard["name"]):
            meta = json.loads(sample.members["json"])
            meta["findings"] = [{**f, "label": RELABEL[f["label"]]} for f in meta["findings"]]
            meta["diagnoses"] = [RELABEL.get(d, d) for d in meta["diagnoses"]]
            samples.append(Sample(sample.key, {**sample.members, "json": json.dumps(meta).encode()}))
        shard["samples"], shard["sha256"] = write_shard(out / shard["name"], samples)
    write_json_atomic(out / MANIFEST, {**manifest, **grammar.to_dict()})
    return out


@pytest.fixture(scope="module")
def toy_stage(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's export as trained on a shard set in TOY's labels: export.json records its grammar."""
    directory = tmp_path_factory.mktemp("toy-run") / "stage1"
    save_export(tiny_model, directory / "export",
                {"stage": "stage1", "step": STEP, "tasks": list(TASKS), **TOY.to_dict()})
    return directory


def test_the_exports_vocabulary_writes_the_targets_and_reads_the_outputs(toy_stage, tiny_shards, tmp_path, one_thread):
    shards = relabelled(tiny_shards, tmp_path / "toy-shards", TOY)
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(toy_stage), "--shards", str(shards), "--features", "live",
                 "--out", str(out), "--overlays", "1", "--max-new-tokens", "8"]) == 0
    records = read_predictions(out / "predictions.jsonl")
    metas = {m["image_id"]: m for s in read_manifest(shards)["shards"] if s["split"] == "test"
             for m in iter_json(shards / s["name"])}
    assert {r.image_id for r in records} == set(metas) and len(records) == 2 * len(metas)
    for r in records:
        assert r.target == TOY.answer(r.task, metas[r.image_id])
    assert any("Mass" in r.target for r in records) and any("are Fibrosis." in r.target for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(compute_metrics(records, TOY)))
    assert list(metrics["strict"]["classification"]["local"])[:2] == ["Mass", "Effusion"]
    assert list(metrics["strict"]["classification"]["global"])[:2] == ["Fibrosis", "No finding"]
    assert "Labels: the vocabulary 'toy' (2 local, 2 global labels)." in (out / "report.md").read_text()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["export"]["vocabulary"] == TOY.vocabulary.to_dict()


def test_a_shard_set_with_another_vocabulary_is_refused_naming_both(stage, toy_stage, tiny_shards, tmp_path, capsys):
    toy_shards = relabelled(tiny_shards, tmp_path / "toy-shards", TOY)
    for run, shards, theirs in ((stage, toy_shards, TOY), (toy_stage, tiny_shards, VINDR)):
        mine = VINDR if run == stage else TOY
        assert main(["evaluate", "--run", str(run), "--shards", str(shards), "--out", str(tmp_path / "no")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"litegpt evaluate: the export {run / 'export'} uses the label vocabulary "
                              f"{mine.vocabulary.describe()}, but the shard set {shards} uses "
                              f"{theirs.vocabulary.describe()}; they must be the same")
        assert not (tmp_path / "no").exists()  # refused before anything ran
    broken = tmp_path / "broken"
    shutil.copytree(toy_shards, broken)
    manifest = read_manifest(broken)
    write_json_atomic(broken / MANIFEST, {**manifest, "vocabulary": {"name": "toy", "local_labels": []}})
    assert main(["evaluate", "--run", str(toy_stage), "--shards", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"{broken / MANIFEST}: manifest.json vocabulary: vocabulary 'toy': no local labels" in err
