"""The text grammar: renders LiteGPT's prompts and targets and parses its generations.

This is the only module that formats or parses the model's text (DESIGN.md "Text grammar"; paper 4.2,
4.4, appendix B). A `Grammar` is one dataset's: its label vocabulary (`labels.Vocabulary`, from the shard
set's manifest) in its task template's sentences (`TaskTemplate`; the paper's by default). Rendering is
strict and deterministic; parsing is total.

Decisions:
- Coordinates: round half up of 100 x the normalised coordinate, taken on the float's shortest decimal
  form (what the shard JSON shows), then clamped to 0..100. So 0.285 -> 29 and 0.125 -> 13, where
  Python's `round` (banker's) or the binary value 0.28499... would give 28 and 12.
- Boxes are the rectangle between two corners: swapped min/max are normalised, when rendering and parsing.
- Several boxes of one label render as repeated entries, `<p>A</p> {...},<p>A</p> {...}`, as the paper
  shows. Findings are ordered by the vocabulary's local labels, then by quantised box, so the text never
  depends on input order.
- An image without findings gets the no-findings answer in stage 1 ("The chest radiograph shows no
  findings.") and "... are <no-finding label>." in stage 2; both parse to the no-finding label. An image
  with local findings but no global disease gets the no-diagnosis answer ("... are none.") in stage 2,
  which parses to no label at all.
- Parsing: a box that is not exactly four integers in 0..100 is not a finding. Its text goes to
  `unparsed` rather than being clamped, which would invent a box the model never produced; its label
  still counts as mentioned. `<p>` entries also accept `<delim>` or commas between several boxes.
- Label names match as whole words, case-insensitively, with an optional plural "s" ("Other diseases"),
  whitespace-tolerant, longest names first. Negation is not understood: "no Cardiomegaly" mentions
  Cardiomegaly. The template's no-findings words ("no findings") mean the no-finding label.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from litegpt.labels import Vocabulary, VocabularyError

IMAGE_PLACEHOLDER = "<ImageHere>"
TASKS = ("identify", "vqa")  # stage 1: grounded findings; stage 2: diagnoses
TASK_TOKENS: dict[str, str] = {"identify": "[identify]", "vqa": "[vqa]"}

Box = tuple[int, int, int, int]
_TASK_TOKEN = re.compile(r"\[[a-z_]+\]")


@dataclass(frozen=True)
class TaskTemplate:
    """The words around the labels: instructions and answer sentences. The defaults are the paper's.

    `vqa` may contain `{global_choices}`: the vocabulary's global labels with each word capitalised, as the
    paper lists them ("COPD, Lung Tumor, ..., or No Finding"). Answers read:
    stage 1 `{local_prefix} <p>label</p> {<x0><y0><x1><y1>},...` or `{no_findings_prefix} {no_findings}.`;
    stage 2 `{global_prefix} label, label.` or `{global_prefix} {no_diagnosis}.`.
    """

    identify: str = (
        "Please describe the critical findings along with their localized bounding boxes in the radiological "
        "image of a chest as much detail as possible. If there are no findings, state that the chest "
        "radiograph shows no findings."
    )
    vqa: str = ("Given the provided chest X-ray image, which of the following diagnoses are present (select all "
                "that apply): {global_choices}?")
    local_prefix: str = "Local diseases of this chest radiograph are"
    global_prefix: str = "Global diseases of this chest radiograph are"
    no_findings_prefix: str = "The chest radiograph shows"
    no_findings: str = "no findings"
    no_diagnosis: str = "none"

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            bare = value.replace("{global_choices}", "") if name == "vqa" and isinstance(value, str) else value
            if not isinstance(value, str) or not value.strip() or re.search(r"[<>{}\n\r]|\[/INST\]", bare):
                raise VocabularyError(f"task template: {name} must be non-empty text on one line without < > {{ }} "
                                      f"or [/INST] (vqa may contain {{global_choices}}), got {value!r}")

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TaskTemplate:
        """A template as `to_dict` writes it, or a user's YAML with some of the fields (the rest are the paper's)."""
        if not isinstance(data, Mapping):
            raise VocabularyError(f"{where}: a task template is a mapping of {', '.join(cls.__dataclass_fields__)}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise VocabularyError(f"{where}: unknown template field(s) {', '.join(map(str, unknown))}; expected "
                                  f"some of {', '.join(cls.__dataclass_fields__)}")
        try:
            return cls(**data)
        except VocabularyError as exc:
            raise VocabularyError(f"{where}: {exc}") from None


PAPER_TEMPLATE = TaskTemplate()


def _quantize(value: float) -> int:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"box coordinate {value!r} is not finite")
    q = int((Decimal(repr(v)) * 100).to_integral_value(rounding=ROUND_HALF_UP))
    return min(100, max(0, q))


def quantize_box(box: Sequence[float]) -> Box:
    """Normalised [x_min, y_min, x_max, y_max] in 0..1 -> the paper's 0..100 integers (see module doc)."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates [x_min, y_min, x_max, y_max], got {list(box)!r}")
    x0, y0, x1, y1 = (_quantize(v) for v in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


@dataclass
class Parsed:
    """What a generation says: boxes (0..100, text order), labels (the vocabulary's order), and the rest.

    `box_spans[i]` is the character span (start, end) of finding i's `{...}` text in the parsed string,
    so per-token scores can be attributed to each box (`metrics.box_confidences`).
    """

    findings: list[tuple[str, Box]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    box_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unparsed


def _words(text: str) -> str:
    """A literal as a regex that tolerates any whitespace between words and around a slash."""
    return r"\s+".join(re.escape(w) for w in text.split()).replace("/", r"\s*/\s*")


_BOX_RE = re.compile(r"\{[^{}]*\}")
_COORDS_RE = re.compile(r"\s*" + r"\s*".join([r"<\s*([0-9]{1,3})\s*>"] * 4) + r"\s*")
_SEPARATOR = re.compile(r"[,.;:]")


def _parse_box(text: str) -> Box | None:
    m = _COORDS_RE.fullmatch(text[1:-1])
    if m is None:
        return None
    x0, y0, x1, y1 = (int(g) for g in m.groups())
    if max(x0, y0, x1, y1) > 100:
        return None
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _headline(label: str) -> str:
    """"Lung tumor" -> "Lung Tumor", "COPD" stays: the paper's spelling of the choices in its vqa instruction."""
    return " ".join(word[:1].upper() + word[1:] for word in label.split())


def _choices(labels: Sequence[str]) -> str:
    names = [_headline(label) for label in labels]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])}{',' if len(names) > 2 else ''} or {names[-1]}"


class Grammar:
    """Renders and parses the text of one dataset: its vocabulary's labels in its template's sentences."""

    def __init__(self, vocabulary: Vocabulary, template: TaskTemplate = PAPER_TEMPLATE):
        self.vocabulary, self.template = vocabulary, template
        t = template
        self.instructions = {"identify": t.identify,
                             "vqa": t.vqa.replace("{global_choices}", _choices(vocabulary.global_labels))}
        self.no_findings_answer = f"{t.no_findings_prefix} {t.no_findings}."
        self.no_diagnosis_answer = f"{t.global_prefix} {t.no_diagnosis}."
        labels = vocabulary.all_labels
        # One named group per label (L<index into all_labels>), longest first so no name shadows a longer one.
        alternatives = "|".join(f"(?P<L{i}>{_words(name)})"
                                for i, name in sorted(enumerate(labels), key=lambda x: -len(x[1])))
        label_pattern = rf"(?<!\w)(?:{alternatives})s?(?!\w)"
        self._label_re = re.compile(label_pattern, re.IGNORECASE)
        # Fixed sentence openings are read and ignored; the no-findings words mean the no-finding label.
        phrases = "|".join(_words(p) for p in (self.no_diagnosis_answer[:-1], t.local_prefix, t.global_prefix,
                                               t.no_findings_prefix))
        self._token_re = re.compile(
            rf"(?P<entry><p>(?P<name>[^<>{{}}]*)</p>(?P<boxes>(?:\s*(?:(?:<delim>|,)\s*)?{_BOX_RE.pattern})*))"
            rf"|(?P<box>{_BOX_RE.pattern})"
            rf"|(?P<phrase>(?<!\w)(?:{phrases})(?!\w))"
            rf"|(?P<nofinding>(?<!\w){_words(t.no_findings)}(?!\w))"
            rf"|{label_pattern}",
            re.IGNORECASE,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Grammar:
        """The grammar a manifest.json or export.json records (`to_dict` keys); records made before vocabularies
        were recorded are VinDr-CXR with the paper's text."""
        template = record.get("template")
        return cls(Vocabulary.of_manifest(record),
                   PAPER_TEMPLATE if template is None else TaskTemplate.from_dict(template, "recorded template"))

    def to_dict(self) -> dict[str, Any]:
        """What `manifest.json` and `export.json` record (top-level keys `vocabulary` and `template`)."""
        return {"vocabulary": self.vocabulary.to_dict(), "template": self.template.to_dict()}

    def prompt(self, task: str, task_token: str | None = None) -> str:
        """The user turn; `task_token` overrides the task's own token (the `[grounding]` ablation)."""
        if task not in self.instructions:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        token = TASK_TOKENS[task] if task_token is None else task_token
        if not _TASK_TOKEN.fullmatch(token):
            raise ValueError(f"task token {token!r} must look like [identify]: lower-case letters in brackets")
        return f"[INST] <Img>{IMAGE_PLACEHOLDER}</Img> {token} {self.instructions[task]} [/INST]"

    def findings(self, findings: Iterable[tuple[str, Sequence[float]]]) -> str:
        """Stage-1 target for (local label, normalised box) pairs; no pairs gives the no-findings answer."""
        local = self.vocabulary.local_labels
        entries = sorted((local.index(self._local_label(name)), quantize_box(box)) for name, box in findings)
        if not entries:
            return self.no_findings_answer
        body = ",".join(f"<p>{local[i]}</p> {{<{b[0]}><{b[1]}><{b[2]}><{b[3]}>}}" for i, b in entries)
        return f"{self.template.local_prefix} {body}."

    def diagnoses(self, labels: Iterable[str]) -> str:
        """Stage-2 target: global labels, deduplicated, in the vocabulary's order.

        An empty list (an image with local findings but no global disease; the label policy gives
        [no_finding] only to images with nothing at all) gives the no-diagnosis answer, which parses to no label.
        """
        vocabulary = self.vocabulary
        names = {vocabulary.canonical(name) for name in labels}
        if not names:
            return self.no_diagnosis_answer
        not_global = sorted(names - set(vocabulary.global_labels))
        if not_global:
            raise ValueError(f"not global labels: {not_global}; expected {', '.join(vocabulary.global_labels)}")
        if vocabulary.no_finding in names and len(names) > 1:
            raise ValueError(f"{vocabulary.no_finding!r} cannot be combined with other diagnoses: {sorted(names)}")
        return f"{self.template.global_prefix} {', '.join(g for g in vocabulary.global_labels if g in names)}."

    def answer(self, task: str, sample: Mapping[str, Any]) -> str:
        """The target for a shard sample's json: its findings for "identify", its diagnoses for "vqa"."""
        key = {"identify": "findings", "vqa": "diagnoses"}.get(task)
        if key is None:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if key not in sample:
            raise ValueError(f"sample {sample.get('image_id', '?')!r} has no {key!r}, needed for task {task!r}")
        if task == "vqa":
            return self.diagnoses(sample[key])
        return self.findings((f["label"], f["box"]) for f in sample[key])

    def _local_label(self, name: str) -> str:
        label = self.vocabulary.canonical(name)
        if label not in self.vocabulary.local_labels:
            raise ValueError(f"{label!r} is not a local label (a finding with a box): "
                             f"{', '.join(self.vocabulary.local_labels)}")
        return label

    def _label_of(self, match: re.Match[str]) -> str:
        return self.vocabulary.all_labels[int(match.lastgroup[1:])]  # type: ignore[index]

    def parse(self, text: str) -> Parsed:
        """Read a generation; never raises. Anything not understood is kept, in order, in `unparsed`."""
        out = Parsed()
        mentioned: set[str] = set()
        local = self.vocabulary.local_labels

        def gap(fragment: str) -> None:
            for piece in _SEPARATOR.split(fragment):
                piece = piece.strip()
                if piece and piece.lower() != "and":
                    out.unparsed.append(piece)

        pos = 0
        for m in self._token_re.finditer(text):
            gap(text[pos : m.start()])
            pos = m.end()
            if m.group("entry") is not None:
                label_match = self._label_re.fullmatch(m.group("name").strip())
                if label_match is None:
                    out.unparsed.append(m.group())
                    continue
                label = self._label_of(label_match)
                mentioned.add(label)
                boxes = list(_BOX_RE.finditer(text, m.start("boxes"), m.end("boxes")))
                if label not in local or not boxes:
                    out.unparsed.append(m.group())
                    continue
                for raw in boxes:
                    box = _parse_box(raw.group())
                    if box is None:
                        out.unparsed.append(raw.group())
                    else:
                        out.findings.append((label, box))
                        out.box_spans.append(raw.span())
            elif m.group("box") is not None:
                out.unparsed.append(m.group())
            elif m.group("nofinding") is not None:
                mentioned.add(self.vocabulary.no_finding)
            elif m.group("phrase") is None:
                mentioned.add(self._label_of(m))
        gap(text[pos:])
        out.labels = [name for name in self.vocabulary.all_labels if name in mentioned]
        return out
