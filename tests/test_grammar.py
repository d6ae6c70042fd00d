"""The text grammar against the paper's literal strings and an independent rounding computation."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litegpt import grammar
from litegpt.grammar import IMAGE_PLACEHOLDER, PAPER_TEMPLATE, Grammar, TaskTemplate, quantize_box
from litegpt.labels import VINDR_CXR, UnknownLabel, Vocabulary, VocabularyError, VocabularyMismatch

# The paper's literal strings are VinDr-CXR's grammar: its vocabulary in the paper's template.
VINDR = Grammar(VINDR_CXR)
render_prompt, render_findings, render_diagnoses = VINDR.prompt, VINDR.findings, VINDR.diagnoses
render_answer, parse, NO_FINDINGS_ANSWER = VINDR.answer, VINDR.parse, VINDR.no_findings_answer
LOCAL_LABELS, GLOBAL_LABELS, ALL_LABELS = VINDR_CXR.local_labels, VINDR_CXR.global_labels, VINDR_CXR.all_labels
NO_FINDING = VINDR_CXR.no_finding


def expected_coord(x: float) -> int:
    """Round half up of 100 * x on the decimal the float prints as, with fractions, clamped to 0..100."""
    q = Fraction(repr(float(x))) * 100 + Fraction(1, 2)
    return min(100, max(0, q.numerator // q.denominator))


def expected_box(box: list[float]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (expected_coord(v) for v in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


# ---- prompts --------------------------------------------------------------------------------------------

def test_prompts_are_the_papers_literal_strings():
    assert IMAGE_PLACEHOLDER == "<ImageHere>"
    assert render_prompt("identify") == (
        "[INST] <Img><ImageHere></Img> [identify] Please describe the critical findings along with their "
        "localized bounding boxes in the radiological image of a chest as much detail as possible. If there are "
        "no findings, state that the chest radiograph shows no findings. [/INST]"
    )
    assert render_prompt("vqa") == (
        "[INST] <Img><ImageHere></Img> [vqa] Given the provided chest X-ray image, which of the following "
        "diagnoses are present (select all that apply): COPD, Lung Tumor, Pneumonia, Tuberculosis, Other "
        "Disease, or No Finding? [/INST]"
    )
    assert render_prompt("identify", "[grounding]") == (
        "[INST] <Img><ImageHere></Img> [grounding] Please describe the critical findings along with their "
        "localized bounding boxes in the radiological image of a chest as much detail as possible. If there are "
        "no findings, state that the chest radiograph shows no findings. [/INST]"
    )


@pytest.mark.parametrize("task, token", [("caption", None), ("identify", "grounding"), ("vqa", "[VQA] x")])
def test_bad_prompt_arguments_are_refused(task, token):
    with pytest.raises(ValueError):
        render_prompt(task, token)


# ---- rendering ------------------------------------------------------------------------------------------

def test_stage1_answer_is_the_design_example():
    text = render_findings(
        [("Cardiomegaly", [0.38, 0.49, 0.82, 0.63]), ("Aortic enlargement", [0.53, 0.28, 0.65, 0.36])]
    )
    assert text == (
        "Local diseases of this chest radiograph are <p>Aortic enlargement</p> {<53><28><65><36>},"
        "<p>Cardiomegaly</p> {<38><49><82><63>}."
    )


def test_stage2_answer_and_spellings():
    assert render_diagnoses(["Pneumonia", "lung tumor"]) == (
        "Global diseases of this chest radiograph are Lung tumor, Pneumonia."
    )
    assert render_diagnoses(["Other diseases", "COPD", "COPD"]) == (
        "Global diseases of this chest radiograph are COPD, Other disease."
    )
    assert render_diagnoses([NO_FINDING]) == "Global diseases of this chest radiograph are No finding."


def test_findings_without_diagnosis_get_a_parseable_answer_that_is_not_no_finding():
    text = render_diagnoses([])
    assert text == "Global diseases of this chest radiograph are none."
    parsed = parse(text)
    assert parsed.labels == [] and parsed.complete


@pytest.mark.parametrize("labels", [["Cardiomegaly"], ["No finding", "COPD"], ["Pneumonitis"]])
def test_bad_diagnoses_are_refused(labels):
    with pytest.raises(ValueError):
        render_diagnoses(labels)


@pytest.mark.parametrize(
    "finding",
    [("No finding", [0, 0, 1, 1]), ("COPD", [0, 0, 1, 1]), ("Edema", [0, 0, 1]), ("Edema", [0, 0, float("nan"), 1])],
)
def test_bad_findings_are_refused(finding):
    with pytest.raises(ValueError):
        render_findings([finding])


def test_no_findings_answers_parse_to_no_finding():
    assert render_findings([]) == NO_FINDINGS_ANSWER == "The chest radiograph shows no findings."
    for text in (render_findings([]), render_diagnoses([NO_FINDING])):
        p = parse(text)
        assert (p.labels, p.findings, p.complete) == ([NO_FINDING], [], True)


@pytest.mark.parametrize(
    "x, q",
    [(0.285, 29), (0.125, 13), (0.005, 1), (0.015, 2), (0.994999, 99), (0.995, 100), (0.0049, 0),
     (-0.2, 0), (1.3, 100), (0.38, 38), (0.49, 49), (0.57, 57), (1 / 3, 33), (2 / 3, 67)],
)
def test_quantize_rounds_half_up_on_the_printed_decimal(x, q):
    assert quantize_box([x, x, x, x]) == (q, q, q, q)
    assert expected_coord(x) == q


def test_quantize_normalises_swapped_corners():
    assert quantize_box([0.8, 0.7, 0.2, 0.1]) == (20, 10, 80, 70)


def test_render_answer_reads_shard_json():
    sample = {
        "image_id": "abc",
        "findings": [
            {"label": "Edema", "box": [0.1, 0.2, 0.3, 0.4]},
            {"label": "Atelectasis", "box": [0.5, 0.5, 0.6, 0.6]},
        ],
        "diagnoses": ["Pneumonia"],
    }
    assert render_answer("identify", sample) == (
        "Local diseases of this chest radiograph are <p>Atelectasis</p> {<50><50><60><60>},"
        "<p>Edema</p> {<10><20><30><40>}."
    )
    assert render_answer("vqa", sample) == "Global diseases of this chest radiograph are Pneumonia."
    with pytest.raises(ValueError, match="diagnoses"):
        render_answer("vqa", {"image_id": "abc", "findings": []})
    with pytest.raises(ValueError):
        render_answer("grounding", sample)


def test_shuffled_findings_render_identically():
    rng = random.Random(0)
    findings = [(label, [rng.random() for _ in range(4)]) for label in LOCAL_LABELS for _ in range(2)]
    findings += [("Nodule/Mass", [0.1, 0.1, 0.2, 0.2]), ("Nodule/Mass", [0.1, 0.1, 0.2, 0.2])]
    reference = render_findings(findings)
    for _ in range(5):
        rng.shuffle(findings)
        assert render_findings(findings) == reference


# ---- round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", LOCAL_LABELS)
def test_each_local_label_round_trips(label):
    boxes = [[0.285, 0.125, 0.5, 0.995], [0.9, 0.8, 0.1, 0.2]]
    findings = [(label, b) for b in boxes] + [("Cardiomegaly", [0.33, 0.44, 0.55, 0.66])]
    p = parse(render_findings(findings))
    order = {name: i for i, name in enumerate(LOCAL_LABELS)}
    expected = sorted(((n, expected_box(b)) for n, b in findings), key=lambda f: (order[f[0]], f[1]))
    assert p.findings == expected
    assert p.labels == sorted({label, "Cardiomegaly"}, key=ALL_LABELS.index)
    assert p.complete


@pytest.mark.parametrize("label", GLOBAL_LABELS)
def test_each_global_label_round_trips(label):
    p = parse(render_diagnoses([label]))
    assert (p.labels, p.findings, p.complete) == ([label], [], True)


def test_all_disease_labels_round_trip_together():
    diseases = [g for g in GLOBAL_LABELS if g != NO_FINDING]
    p = parse(render_diagnoses(reversed(diseases)))
    assert (p.labels, p.complete) == (diseases, True)


# ---- the paper's strings --------------------------------------------------------------------------------

PAPER = [
    # Table 7, example 1 predict / ground truth, example 2 predict / ground truth (no trailing period).
    ("Local diseases of this chest radiograph are <p>Aortic enlargement</p> {< 56 >< 17 >< 67 >< 28 >}, "
     "<p>Cardiomegaly</p> {< 38 >< 48 >< 85 >< 65 >}",
     [("Aortic enlargement", (56, 17, 67, 28)), ("Cardiomegaly", (38, 48, 85, 65))]),
    ("Local diseases of this chest radiograph are <p>Calcification</p> {< 60 >< 21 >< 66 >< 29 >}, "
     "<p>Cardiomegaly</p> {< 35 >< 50 >< 86 >< 67 >}",
     [("Calcification", (60, 21, 66, 29)), ("Cardiomegaly", (35, 50, 86, 67))]),
    ("Local diseases of this chest radiograph are <p>Aortic enlargement</p> {< 48 >< 25 >< 60 >< 36 >}, "
     "<p>Cardiomegaly</p> {< 42 >< 51 >< 74 >< 62 >}",
     [("Aortic enlargement", (48, 25, 60, 36)), ("Cardiomegaly", (42, 51, 74, 62))]),
    ("Local diseases of this chest radiograph are <p>Cardiomegaly</p> {< 38 >< 48 >< 75 >< 65 >}, "
     "<p>Aortic enlargement</p> {< 39 >< 27 >< 64 >< 48 >}",
     [("Cardiomegaly", (38, 48, 75, 65)), ("Aortic enlargement", (39, 27, 64, 48))]),
    # Appendix B.1 answer (the paper's markdown link around the prefix removed).
    ("Local diseases of this chest radiograph are <p>Aortic enlargement</p> {< 53 >< 28 >< 65 >< 36 >},"
     "<p>Cardiomegaly</p> {< 38 >< 49 >< 82 >< 63 >}.",
     [("Aortic enlargement", (53, 28, 65, 36)), ("Cardiomegaly", (38, 49, 82, 63))]),
]


@pytest.mark.parametrize("text, findings", PAPER)
def test_paper_localisation_strings(text, findings):
    p = parse(text)
    assert p.findings == findings
    assert p.labels == sorted({f[0] for f in findings}, key=ALL_LABELS.index)
    assert p.complete


def test_paper_diagnosis_string():
    p = parse("Global diseases of this chest radiograph are Lung tumor, Pneumonia, Tuberculosis.")
    assert (p.labels, p.findings, p.complete) == (["Lung tumor", "Pneumonia", "Tuberculosis"], [], True)


# ---- tolerance and strictness ---------------------------------------------------------------------------

def test_whole_words_case_insensitive():
    assert parse("mild opacity, no cardiomegaly").labels == ["Cardiomegaly"]
    assert parse("ILD").labels == ["ILD"]
    assert parse("ild; Lung  opacity").labels == ["ILD", "Lung Opacity"]
    assert parse("Oedematous ILDx COPDs Edematous").labels == ["COPD"]
    assert parse("Lung tumour").labels == []
    assert parse("Other Disease. other diseases").labels == ["Other disease"]
    assert parse("Nodule / mass").labels == ["Nodule/Mass"]


def test_spacing_and_separators():
    a = parse("Local diseases of this chest radiograph are<p>Edema</p>{<1><2><3><4>}, <p> edema </p>{< 5 ><6><7 ><8>}")
    assert a.findings == [("Edema", (1, 2, 3, 4)), ("Edema", (5, 6, 7, 8))]
    assert a.complete
    b = parse("<p>Edema</p> {<1><2><3><4>}<delim>{<5><6><7><8>}, {<9><9><9><9>}.")
    assert b.findings == [("Edema", (1, 2, 3, 4)), ("Edema", (5, 6, 7, 8)), ("Edema", (9, 9, 9, 9))]
    assert b.complete


def test_swapped_corners_are_normalised():
    assert parse("<p>Edema</p> {<70><80><10><20>}").findings == [("Edema", (10, 20, 70, 80))]


@pytest.mark.parametrize(
    "bad", ["{<1><2><3>}", "{<1><2><3><4><5>}", "{<1><2><3><101>}", "{<1.5><2><3><4>}", "{<-1><2><3><4>}", "{}"]
)
def test_malformed_box_is_unparsed_but_label_counts(bad):
    p = parse(f"<p>Edema</p> {bad},<p>Cardiomegaly</p> {{<1><2><3><4>}}")
    assert p.findings == [("Cardiomegaly", (1, 2, 3, 4))]
    assert p.labels == ["Cardiomegaly", "Edema"]
    assert p.unparsed == [bad]
    assert not p.complete


@pytest.mark.parametrize(
    "text, fragment, labels",
    [
        ("<p>Pneumonitis</p> {<1><2><3><4>}", "<p>Pneumonitis</p> {<1><2><3><4>}", []),
        ("<p>Edema</p>.", "<p>Edema</p>", ["Edema"]),
        ("<p>Pneumonia</p> {<1><2><3><4>}", "<p>Pneumonia</p> {<1><2><3><4>}", ["Pneumonia"]),
        ("{<1><2><3><4>}", "{<1><2><3><4>}", []),
        ("<p>Edema</p> {<1><2><3><4>}. I hope this helps", "I hope this helps", ["Edema"]),
    ],
)
def test_unparsed_fragments(text, fragment, labels):
    p = parse(text)
    assert p.unparsed == [fragment]
    assert p.labels == labels


def test_parse_is_linear_on_huge_adversarial_input():
    for piece in ("<p>", "{", "<p>Edema</p>" + " " * 50, "Lung ", "Local diseases of this chest ", "\u017f"):
        text = piece * (200_000 // len(piece))
        start = time.perf_counter()
        parse(text)
        assert time.perf_counter() - start < 5, piece


# ---- properties -----------------------------------------------------------------------------------------

coord = st.floats(min_value=-0.2, max_value=1.2, allow_nan=False)
finding = st.tuples(st.sampled_from(LOCAL_LABELS), st.lists(coord, min_size=4, max_size=4))
FRAGMENTS = [
    "<p>", "</p>", "{", "}", "<", ">", "<delim>", ",", ", ", ".", " ", "\n", "0", "42", "100", "101", "999",
    "<p>Cardiomegaly</p>", "{<1><2><3><4>}", "{< 53 >< 28 >< 65 >< 36 >}",
    "Local diseases of this chest radiograph are",
    "Global diseases of this chest radiograph are", NO_FINDINGS_ANSWER, "mild", "\u017f", "\u0130", "é", *ALL_LABELS,
]


def check_invariants(p: grammar.Parsed) -> None:
    assert p.labels == sorted(set(p.labels), key=ALL_LABELS.index)
    for label, box in p.findings:
        assert label in LOCAL_LABELS and label in p.labels
        assert all(0 <= v <= 100 for v in box) and box[0] <= box[2] and box[1] <= box[3]
    assert all(isinstance(f, str) and f for f in p.unparsed)
    assert p.complete == (not p.unparsed)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text):
    check_invariants(parse(text))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS)).map("".join))
def test_parse_never_raises_on_grammar_fragments(text):
    check_invariants(parse(text))


@settings(max_examples=200, deadline=None)
@given(st.lists(finding, max_size=8))
def test_rendered_findings_parse_back(findings):
    p = parse(render_findings(findings))
    order = {name: i for i, name in enumerate(LOCAL_LABELS)}
    expected = sorted(((n, expected_box(b)) for n, b in findings), key=lambda f: (order[f[0]], f[1]))
    assert p.findings == expected
    assert p.labels == (sorted({n for n, _ in findings}, key=ALL_LABELS.index) if findings else [NO_FINDING])
    assert p.complete


@settings(max_examples=100, deadline=None)
@given(st.sets(st.sampled_from([g for g in GLOBAL_LABELS if g != NO_FINDING]), min_size=1))
def test_rendered_diagnoses_parse_back(labels):
    p = parse(render_diagnoses(labels))
    assert (p.labels, p.complete) == ([g for g in GLOBAL_LABELS if g in labels], True)


# ---- box spans ------------------------------------------------------------------------------------------

def test_box_spans_locate_each_parsed_box_in_the_text():
    text = ("Local diseases of this chest radiograph are <p>Cardiomegaly</p> {<38><49><82><63>},"
            "<p>Nodule/Mass</p> {<1><2><3><4>}<delim>{<5><6><777><8>} and {<9><9><9><9>}"
            "<p>Nodule/Mass</p>{ <10> <20> <30> <40> }.")
    p = parse(text)
    # By hand: the valid boxes, in text order; the bad one (777) and the stray one have no span.
    starts = [text.index("{<38>"), text.index("{<1>"), text.index("{ <10>")]
    ends = [text.index("}", s) + 1 for s in starts]
    assert p.box_spans == list(zip(starts, ends))
    assert [b for _, b in p.findings] == [(38, 49, 82, 63), (1, 2, 3, 4), (10, 20, 30, 40)]
    assert "{<5><6><777><8>}" in p.unparsed and "{<9><9><9><9>}" in p.unparsed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS)).map("".join))
def test_box_spans_align_with_findings(text):
    p = parse(text)
    assert len(p.box_spans) == len(p.findings)
    for (start, end), finding in zip(p.box_spans, p.findings):
        box_text = text[start:end]
        assert box_text.startswith("{") and box_text.endswith("}")
        assert grammar._parse_box(box_text) == finding[1]


# ---- other vocabularies and templates -------------------------------------------------------------------

TOY = Vocabulary.build("toy-hospital", ["Mass", "Pleural effusion", "Opacity (diffuse)"], ["Sepsis", "Heart failure"],
                       no_finding="Normal", aliases={"effusion": "Pleural effusion"})
TOY_TEMPLATE = TaskTemplate(identify="List the findings with boxes.", local_prefix="Findings of this radiograph are",
                            no_findings_prefix="This radiograph shows", no_findings="nothing abnormal",
                            global_prefix="Conditions are", no_diagnosis="absent")
TOY_GRAMMAR = Grammar(TOY, TOY_TEMPLATE)
toy_finding = st.tuples(st.sampled_from(TOY.local_labels), st.lists(st.floats(0, 1), min_size=4, max_size=4))


def test_a_vocabulary_of_its_own_renders_in_its_templates_words():
    g = TOY_GRAMMAR
    assert g.prompt("vqa").endswith("(select all that apply): Sepsis, Heart Failure, or Normal? [/INST]")
    assert g.prompt("identify") == "[INST] <Img><ImageHere></Img> [identify] List the findings with boxes. [/INST]"
    text = g.findings([("effusion", [0.5, 0.5, 0.1, 0.2]), ("Mass", [0.1, 0.2, 0.3, 0.4])])
    assert text == ("Findings of this radiograph are <p>Mass</p> {<10><20><30><40>},"
                    "<p>Pleural effusion</p> {<10><20><50><50>}.")
    assert g.findings([]) == "This radiograph shows nothing abnormal."
    assert g.diagnoses(["heart failure", "Sepsis"]) == "Conditions are Sepsis, Heart failure."
    assert g.diagnoses([]) == "Conditions are absent."
    assert g.parse(g.findings([])).labels == ["Normal"] and g.parse(g.findings([])).complete
    assert g.parse(g.diagnoses(["Normal"])).labels == ["Normal"]
    assert g.parse(g.diagnoses([])).labels == [] and g.parse(g.diagnoses([])).complete
    # whole words only; a VinDr label means nothing here
    p = g.parse("Massive Cardiomegaly, Opacity (diffuse).")
    assert p.labels == ["Opacity (diffuse)"] and p.unparsed == ["Massive Cardiomegaly"]
    with pytest.raises(ValueError, match="not a local label"):
        g.findings([("Sepsis", [0, 0, 1, 1])])
    with pytest.raises(UnknownLabel, match="toy-hospital"):
        g.diagnoses(["COPD"])


@settings(max_examples=200, deadline=None)
@given(st.lists(toy_finding, max_size=6))
def test_a_vocabulary_of_its_own_parses_back(findings):
    p = TOY_GRAMMAR.parse(TOY_GRAMMAR.findings(findings))
    expected = sorted(((n, expected_box(b)) for n, b in findings), key=lambda f: (TOY.local_labels.index(f[0]), f[1]))
    assert p.findings == expected and p.complete
    assert p.labels == (sorted({n for n, _ in findings}, key=TOY.all_labels.index) if findings else ["Normal"])


@pytest.mark.parametrize("labels, choices", [(["A"], "A"), (["tb", "No finding"], "Tb or No Finding"),
                                             (["x y", "COPD", "No finding"], "X Y, COPD, or No Finding")])
def test_global_choices_are_listed_as_the_paper_does(labels, choices):
    vocabulary = Vocabulary("v", ("L",), tuple(labels), labels[-1])
    assert Grammar(vocabulary).instructions["vqa"].endswith(f"(select all that apply): {choices}?")


def test_grammar_round_trips_through_a_record_and_old_records_are_vindr():
    record = TOY_GRAMMAR.to_dict()
    again = Grammar.from_record(record)
    assert (again.vocabulary, again.template) == (TOY, TOY_TEMPLATE)
    old = Grammar.from_record({"format": "litegpt-shards/1"})
    assert (old.vocabulary, old.template) == (VINDR_CXR, PAPER_TEMPLATE)
    with pytest.raises(VocabularyMismatch, match="the export e/.*toy-hospital.*the shard set s/.*vindr-cxr"):
        TOY.require_same(VINDR_CXR, "the export e/", "the shard set s/")
    TOY.require_same(Vocabulary.from_dict(TOY.to_dict(), "x"), "a", "b")


@pytest.mark.parametrize("kwargs, message", [
    (dict(local_labels=()), "no local labels"),
    (dict(local_labels=("Mass", "mass")), "given twice"),
    (dict(local_labels=("<p>",)), "must be text"),
    (dict(local_labels=("a  b",)), "must be text"),
    (dict(global_labels=("Sepsis",)), "must end with the no-finding label"),
    (dict(aliases={"x": "Nothing"}), "names 'Nothing'"),
    (dict(aliases={"Mass": "Normal"}), "shadow the label 'Mass'"),
])
def test_bad_vocabularies_are_refused(kwargs, message):
    args = dict(name="v", local_labels=("Mass",), global_labels=("Normal",), no_finding="Normal") | kwargs
    with pytest.raises(VocabularyError, match=message):
        Vocabulary(**args)


def test_label_and_template_files_name_the_file_and_the_problem(tmp_path):
    good = tmp_path / "labels.yaml"
    good.write_text("name: toy\nlocal_labels: [Mass, Nodule]\nglobal_labels: [Sepsis]\n")
    assert Vocabulary.from_yaml(good) == Vocabulary.build("toy", ["Mass", "Nodule"], ["Sepsis"])
    for text, message in [("name: toy\nlocal_labels: Mass\n", "local_labels must be a list"),
                          ("name: toy\nlocal: [Mass]\n", "unknown key"), ("name: [toy\n", "not valid YAML")]:
        good.write_text(text)
        with pytest.raises(VocabularyError, match=f"{good}.*{message}"):
            Vocabulary.from_yaml(good)
    with pytest.raises(VocabularyError, match="label file not found"):
        Vocabulary.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(VocabularyError, match="t.yaml: unknown template field.*prefix"):
        TaskTemplate.from_dict({"prefix": "x"}, "t.yaml")
    with pytest.raises(VocabularyError, match="t.yaml: task template: vqa"):
        TaskTemplate.from_dict({"vqa": "Which of {choices}?"}, "t.yaml")
    assert TaskTemplate.from_dict({"no_diagnosis": "nothing"}, "t.yaml").identify == PAPER_TEMPLATE.identify
