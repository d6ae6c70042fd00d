"""Validation during training: the split (carved by a hash of image_id, or the shards' `val`), the recipe's
`eval` section, the training stream leaving validation images out, and the `Validator` on the tiny model:
its loss against a per-sample recomputation, its generation figures against `litegpt evaluate` on the same
images, 2 ranks = 1 rank, and the model, its buffers and the RNG left as they were."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from litegpt.data.shards import iter_json, iter_samples, read_manifest, read_samples
from litegpt.data.splits import VALIDATION_SPLIT, Holdout, choose_holdout, hash_share
from litegpt.distributed import free_port
from litegpt.eval.validation import SCORED, ValidationPlan, Validator
from litegpt.grammar import Grammar
from litegpt.labels import VINDR_CXR
from litegpt.model.config import ConfigError, Visual
from litegpt.model.inputs import IGNORE_INDEX, TrainSample
from litegpt.train.config import VALIDATION_FIGURES, data_record, load_train_config, validation_holdout

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs/tiny/stage1.yaml"
TASKS = ("identify", "vqa")
BATCH, GENERATE = 4, 5
VINDR = Grammar(VINDR_CXR)


# ---- the split --------------------------------------------------------------------------------------

def test_hash_share_is_the_sha256_of_the_id_as_a_fraction():
    for image_id in ("000434271f63a053c4128a0ba6352c7f", "1.2.840.113619/é", ""):
        expected = int(hashlib.sha256(image_id.encode()).hexdigest()[:16], 16) / 16**16
        assert hash_share(image_id) == expected


def test_the_carve_holds_out_about_the_fraction_and_grows_with_it():
    ids = [f"{i:032x}" for i in range(4000)]
    small, large = ({i for i in ids if Holdout("train", f).holds(i)} for f in (0.1, 0.25))
    for held, fraction in ((small, 0.1), (large, 0.25)):  # binomial: within 5 standard deviations
        assert abs(len(held) - fraction * len(ids)) < 5 * math.sqrt(len(ids) * fraction * (1 - fraction))
    assert small < large  # raising the fraction only adds images
    holdout = Holdout("train", 0.25)
    assert all(holdout.trains("train", i) != (i in large) for i in ids)  # training and validation are disjoint
    assert all(holdout.trains("test", i) for i in ids)  # other splits are not carved


def test_an_explicit_val_split_is_used_whole_and_not_together_with_a_fraction():
    splits = {"train": {"samples": 10}, VALIDATION_SPLIT: {"samples": 3}, "test": {"samples": 2}}
    holdout = choose_holdout(splits, "train", 0.0)
    assert holdout == Holdout(VALIDATION_SPLIT) and holdout.holds("anything") and holdout.trains("train", "anything")
    with pytest.raises(ValueError, match="explicit 'val' split, and a nonzero fraction"):
        choose_holdout(splits, "train", 0.1)
    assert choose_holdout({"train": {"samples": 10}}, "train", 0.0) is None
    assert choose_holdout({"train": {"samples": 10}}, "train", 0.2) == Holdout("train", 0.2)


# ---- the recipe -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("eval.fraction=1", "eval.fraction"), ("eval.fraction=-0.1", "eval.fraction"), ("eval.every=-1", "eval.every"),
    ("eval.generate=-1", "eval.generate"), ("eval.batch=0", "eval.batch"), ("eval.best=accuracy", "eval.best")])
def test_eval_values_that_cannot_work_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{RECIPE}: {key} must be ") as refused:
        load_train_config(RECIPE, [override])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("overrides, message", [
    (["eval.best=strict/global/micro_avg_f1"], r"scored on \[vqa\] generations, but stage.tasks = \['identify'\]"),
    (["eval.best=parse/all_rate", "eval.generate=0"], "scored on generations, but eval.generate = 0"),
])
def test_a_best_figure_the_stage_cannot_give_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(RECIPE, overrides)


def test_every_figure_the_recipe_may_choose_is_one_the_validator_reports():
    assert set(VALIDATION_FIGURES) == {"loss", *SCORED}


def test_the_fraction_is_in_the_config_digest_and_the_other_eval_values_are_not():
    base = load_train_config(RECIPE, ["eval.fraction=0.2"]).digest()
    assert load_train_config(RECIPE, ["eval.fraction=0.1"]).digest() != base
    for override in ("eval.every=5", "eval.generate=3", "eval.batch=2", "eval.best=parse/all_rate"):
        assert load_train_config(RECIPE, ["eval.fraction=0.2", override]).digest() == base


def recipe_on(shards: Path, *overrides: str):
    return load_train_config(RECIPE, [f"data.shards={shards}", *overrides])


def test_the_validation_split_is_recorded_and_both_at_once_refused_naming_them(make_shards, tmp_path):
    plain = make_shards(tmp_path / "plain", {"train": [6, 6], "test": [2]})
    assert data_record(recipe_on(plain, "eval.fraction=0"))["validation"] is None
    assert data_record(recipe_on(plain, "eval.fraction=0.3"))["validation"] == {"split": "train", "fraction": 0.3}
    with_val = make_shards(tmp_path / "with-val", {"train": [6], VALIDATION_SPLIT: [3], "test": [2]})
    assert data_record(recipe_on(with_val, "eval.fraction=0"))["validation"] == {"split": VALIDATION_SPLIT,
                                                                                  "fraction": None}
    with pytest.raises(ValueError) as refused:
        validation_holdout(recipe_on(with_val, "eval.fraction=0.1"))
    assert str(refused.value).startswith(f"{with_val}: data.split = train, eval.fraction = 0.1: the shards have an "
                                         "explicit 'val' split")


def test_a_resume_holding_out_other_images_names_the_change(make_shards, tmp_path):
    """Checkpoints record the split (data_record): resuming with another is refused as other data, named."""
    from litegpt.train.checkpoint import _data_differences

    plain = make_shards(tmp_path / "plain", {"train": [6, 6], "test": [2]})
    before, now = (data_record(recipe_on(plain, f"eval.fraction={f}")) for f in (0.2, 0.1))
    assert _data_differences(before, now) == [f"validation was {before['validation']!r}, now {now['validation']!r}"]
    assert _data_differences(before, before) == []


# ---- the training stream ----------------------------------------------------------------------------

def test_the_stream_never_trains_on_a_validation_image(make_shards, tiny_config, tmp_path):
    from litegpt.train.stream import TrainStream, eligible_counts

    shards = make_shards(tmp_path / "set", {"train": [8, 8, 8], "test": [2]})
    fraction = 0.4
    holdout = Holdout("train", fraction)
    metas = {s["name"]: list(iter_json(shards / s["name"])) for s in read_manifest(shards)["shards"]
             if s["split"] == "train"}
    held = {m["image_id"] for ms in metas.values() for m in ms if hash_share(m["image_id"]) < fraction}
    assert 0 < len(held) < 24  # the test means something
    for findings_only in (False, True):
        expected = {name: sum(m["image_id"] not in held and (bool(m["findings"]) or not findings_only) for m in ms)
                    for name, ms in metas.items()}
        assert eligible_counts(shards, "train", findings_only, holdout) == expected

    model = tiny_config.to_dict()
    model_file = tmp_path / "model.yaml"
    model_file.write_text(yaml.safe_dump(model))
    cfg = load_train_config(RECIPE, [f"model={model_file}", f"data.shards={shards}", f"eval.fraction={fraction}",
                                     "data.features=live", "stage.findings_only=false", "train.micro_batch=2"])
    stream = TrainStream.from_recipe(cfg, tiny_config, shards, 0, 1)
    assert stream.spec.n_samples == 24 - len(held)
    raws = [raw for s in read_manifest(shards)["shards"] if s["split"] == "train"
            for raw in read_samples([shards / s["name"]])]
    trained = {s.key.split("/")[0] for raw in raws for s in stream._samples(raw)}
    assert trained == {m["image_id"] for ms in metas.values() for m in ms} - held


# ---- the validator ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    """Training shards and an explicit `val` split of 7 images in two shards, 3 with findings."""
    from conftest import write_tiny_shards

    return write_tiny_shards(tmp_path_factory.mktemp("val-shards") / "set",
                             {"train": [4, 4], VALIDATION_SPLIT: [4, 3], "test": [2]}, seed=3)


def make_plan(shards: Path, stage_dir: Path, holdout: Holdout = Holdout(VALIDATION_SPLIT), *, tasks=TASKS,
              findings_only: bool = False, batch: int = BATCH, generate: int = GENERATE) -> ValidationPlan:
    return ValidationPlan(shards, Visual.LIVE, "configs/model_tiny.yaml", holdout, tasks, None, findings_only, batch,
                          generate, stage_dir)


def test_the_loss_is_the_token_weighted_mean_over_the_whole_split(tiny_model, tiny_config, val_shards, tmp_path,
                                                                  one_thread):
    """Against a per-sample recomputation: the per-token cross-entropies of each answer, summed over the split."""
    validator = Validator(make_plan(val_shards, tmp_path, batch=3, generate=0), tiny_config, 0, 1)
    assert validator.samples == 7 * len(TASKS)
    figures = validator(tiny_model, 0)
    assert set(figures) == {"loss"}

    total, tokens = 0.0, 0
    with torch.no_grad():
        for sample in iter_samples(val_shards, VALIDATION_SPLIT):
            meta = sample["json"]
            for task in TASKS:
                pixels = tiny_model.vision.preprocess(sample["png"])
                batch = tiny_model.inputs.train_batch([TrainSample("k", VINDR.prompt(task), VINDR.answer(task, meta),
                                                                   pixels, Visual.LIVE)])
                logits = tiny_model.llm(inputs_embeds=tiny_model._embeds(batch),
                                        attention_mask=batch.attention_mask).logits
                labels = batch.labels[0, 1:]
                answer = labels != IGNORE_INDEX
                total += F.cross_entropy(logits[0, :-1][answer].double(), labels[answer], reduction="sum").item()
                tokens += int(answer.sum())
    assert figures["loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_findings_only_validates_on_the_images_with_findings(tiny_config, val_shards, tmp_path):
    validator = Validator(make_plan(val_shards, tmp_path, tasks=("identify",), findings_only=True), tiny_config, 0, 1)
    with_findings = [m for m in (s["json"] for s in iter_samples(val_shards, VALIDATION_SPLIT)) if m["findings"]]
    assert [m["image_id"] for m in validator.images] == [m["image_id"] for m in with_findings]


def test_a_validation_split_without_an_image_is_refused(make_shards, tiny_config, tmp_path):
    shards = make_shards(tmp_path / "set", {"train": [2], "test": [2]})
    with pytest.raises(ConfigError, match=r"the share 1e-09 \(eval.fraction\) of split 'train' holds no validation"):
        Validator(make_plan(shards, tmp_path, Holdout("train", 1e-9)), tiny_config, 0, 1)


def test_generation_figures_are_those_of_litegpt_evaluate_on_the_same_images(tiny_model, tiny_config, val_shards,
                                                                             tmp_path, one_thread):
    from litegpt.eval.evaluate import EvalOptions, evaluate
    from litegpt.eval.report import scalars
    from litegpt.model.export import save_export

    stage = tmp_path / "stage"
    save_export(tiny_model, stage / "export", {"stage": "stage", "step": 0, "tasks": list(TASKS)})
    _, metrics = evaluate(EvalOptions(run=stage, shards=val_shards, split=VALIDATION_SPLIT, limit=GENERATE,
                                      batch_size=BATCH, features=Visual.LIVE, overlays=0))
    expected = {name: value for name, value in scalars(metrics).items() if name in SCORED}
    assert {"parse/all_rate", "strict/local/micro_avg_f1", "strict/global/micro_avg_f1"} <= set(expected)

    figures = Validator(make_plan(val_shards, tmp_path), tiny_config, 0, 1)(tiny_model, 0)
    assert figures == {"loss": figures["loss"], **expected}


def test_the_shard_sets_vocabulary_writes_the_targets_and_scores_the_generations(tiny_model, tiny_config, val_shards,
                                                                                tmp_path, one_thread):
    """On a shard set in another vocabulary the validator's grammar is the set's: VinDr-CXR's would refuse its
    labels (rendering a target, scoring the ground truth)."""
    from test_evaluate import TOY, relabelled

    shards = relabelled(val_shards, tmp_path / "toy", TOY)
    validator = Validator(make_plan(shards, tmp_path, generate=2), tiny_config, 0, 1)
    assert validator.stage.grammar.vocabulary == TOY.vocabulary
    assert validator.stage.prompt("vqa") == TOY.prompt("vqa")
    figures = validator(tiny_model, 0)
    assert {"loss", "parse/all_rate", "strict/local/micro_avg_f1", "strict/global/micro_avg_f1"} <= set(figures)


def model_state(model) -> tuple[dict, dict, torch.Tensor]:
    return ({n: t.clone() for n, t in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()},
            torch.get_rng_state())


def assert_same_state(before, after) -> None:
    (tensors, modes, rng), (tensors2, modes2, rng2) = before, after
    assert tensors.keys() == tensors2.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert modes == modes2
    assert torch.equal(rng, rng2)


def _rank(rank: int, world: int, port: int, config, shards: Path, stage_dir: Path, out: Path) -> None:
    """One rank of the 2-rank validation: rank 1's merge.norm statistics differ from rank 0's (as after
    training on other batches); the figures must be rank 0's model's, and each rank's model left as it was."""
    from litegpt.model.model import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial projector on every rank
    model = build_model(config).train()
    if rank == 1:
        with torch.no_grad():
            model.merge.norm.norm.running_mean.add_(0.5)
    torch.manual_seed(11)
    before = model_state(model)
    figures = Validator(make_plan(shards, stage_dir), config, rank, world)(model, 3)
    assert_same_state(before, model_state(model))
    torch.save(figures, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_figures_of_one_and_leave_every_rank_as_it_was(tiny_config, val_shards, tmp_path,
                                                                           one_thread):
    from litegpt.model.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config).train()
    torch.manual_seed(11)
    before = model_state(model)
    alone = Validator(make_plan(val_shards, tmp_path), tiny_config, 0, 1)(model, 3)
    assert_same_state(before, model_state(model))  # training mode, weights, buffers and the RNG as they were
    assert {"loss", "parse/all_rate", "strict/local/micro_avg_f1"} <= set(alone) <= {"loss", *SCORED}

    torch.multiprocessing.spawn(_rank, (2, free_port(), tiny_config, val_shards, tmp_path, tmp_path), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == alone
