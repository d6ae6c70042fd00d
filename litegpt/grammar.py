"""The text grammar: renders LiteGPT's prompts and targets and parses its generations.

This is the only module that formats or parses the model's text (DESIGN.md "Text grammar"; paper 4.2,
4.4, appendix B). Rendering is strict and deterministic; parsing is total.

Decisions:
- Coordinates: round half up of 100 x the normalised coordinate, taken on the float's shortest decimal
  form (what the shard JSON shows), then clamped to 0..100. So 0.285 -> 29 and 0.125 -> 13, where
  Python's `round` (banker's) or the binary value 0.28499... would give 28 and 12.
- Boxes are the rectangle between two corners: swapped min/max are normalised, when rendering and parsing.
- Several boxes of one label render as repeated entries, `<p>A</p> {...},<p>A</p> {...}`, as the paper
  shows. Findings are ordered by LOCAL_LABELS, then by quantised box, so the text never depends on
  input order.
- An image without findings gets NO_FINDINGS_ANSWER in stage 1 and "... are No finding." in stage 2;
  both parse to the label NO_FINDING. An image with local findings but no global disease gets
  NO_DIAGNOSIS_ANSWER ("... are none.") in stage 2, which parses to no label at all.
- Parsing: a box that is not exactly four integers in 0..100 is not a finding. Its text goes to
  `unparsed` rather than being clamped, which would invent a box the model never produced; its label
  still counts as mentioned. `<p>` entries also accept `<delim>` or commas between several boxes.
- Label names match as whole words, case-insensitively, with an optional plural "s" ("no findings",
  "Other diseases"), whitespace-tolerant, longest names first. Negation is not understood:
  "no Cardiomegaly" mentions Cardiomegaly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from litegpt.labels import ALL_LABELS, GLOBAL_LABELS, LOCAL_LABELS, NO_FINDING, canonical_label

IMAGE_PLACEHOLDER = "<ImageHere>"
TASKS = ("identify", "vqa")  # stage 1: grounded findings; stage 2: diagnoses
TASK_TOKENS: dict[str, str] = {"identify": "[identify]", "vqa": "[vqa]"}
INSTRUCTIONS: dict[str, str] = {
    "identify": (
        "Please describe the critical findings along with their localized bounding boxes in the radiological "
        "image of a chest as much detail as possible. If there are no findings, state that the chest "
        "radiograph shows no findings."
    ),
    "vqa": (
        "Given the provided chest X-ray image, which of the following diagnoses are present (select all that "
        "apply): COPD, Lung Tumor, Pneumonia, Tuberculosis, Other Disease, or No Finding?"
    ),
}
LOCAL_PREFIX = "Local diseases of this chest radiograph are"
GLOBAL_PREFIX = "Global diseases of this chest radiograph are"
NO_FINDINGS_PREFIX = "The chest radiograph shows"
NO_FINDINGS_ANSWER = f"{NO_FINDINGS_PREFIX} no findings."
# Stage 2 for an image with local findings but none of the five global diseases: not "No finding".
NO_DIAGNOSIS_ANSWER = f"{GLOBAL_PREFIX} none."

Box = tuple[int, int, int, int]
_TASK_TOKEN = re.compile(r"\[[a-z_]+\]")


def render_prompt(task: str, task_token: str | None = None) -> str:
    """The user turn; `task_token` overrides the task's own token (the `[grounding]` ablation)."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(INSTRUCTIONS)}")
    token = TASK_TOKENS[task] if task_token is None else task_token
    if not _TASK_TOKEN.fullmatch(token):
        raise ValueError(f"task token {token!r} must look like [identify]: lower-case letters in brackets")
    return f"[INST] <Img>{IMAGE_PLACEHOLDER}</Img> {token} {INSTRUCTIONS[task]} [/INST]"


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


def _local_label(name: str) -> str:
    label = canonical_label(name)
    if label not in LOCAL_LABELS:
        raise ValueError(f"{label!r} is not a local label (a finding with a box): {', '.join(LOCAL_LABELS)}")
    return label


def render_findings(findings: Iterable[tuple[str, Sequence[float]]]) -> str:
    """Stage-1 target for (local label, normalised box) pairs; no pairs gives NO_FINDINGS_ANSWER."""
    entries = sorted((LOCAL_LABELS.index(_local_label(name)), quantize_box(box)) for name, box in findings)
    if not entries:
        return NO_FINDINGS_ANSWER
    body = ",".join(f"<p>{LOCAL_LABELS[i]}</p> {{<{b[0]}><{b[1]}><{b[2]}><{b[3]}>}}" for i, b in entries)
    return f"{LOCAL_PREFIX} {body}."


def render_diagnoses(labels: Iterable[str]) -> str:
    """Stage-2 target: global labels, deduplicated, in GLOBAL_LABELS order.

    An empty list (an image with local findings but no global disease; the label policy gives
    ["No finding"] only to images with nothing at all) gives NO_DIAGNOSIS_ANSWER, which parses to no label.
    """
    names = {canonical_label(name) for name in labels}
    if not names:
        return NO_DIAGNOSIS_ANSWER
    not_global = sorted(names - set(GLOBAL_LABELS))
    if not_global:
        raise ValueError(f"not global labels: {not_global}; expected {', '.join(GLOBAL_LABELS)}")
    if NO_FINDING in names and len(names) > 1:
        raise ValueError(f"{NO_FINDING!r} cannot be combined with other diagnoses: {sorted(names)}")
    return f"{GLOBAL_PREFIX} {', '.join(g for g in GLOBAL_LABELS if g in names)}."


def render_answer(task: str, sample: Mapping[str, Any]) -> str:
    """The target for a shard sample's json: its findings for "identify", its diagnoses for "vqa"."""
    key = {"identify": "findings", "vqa": "diagnoses"}.get(task)
    if key is None:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(INSTRUCTIONS)}")
    if key not in sample:
        raise ValueError(f"sample {sample.get('image_id', '?')!r} has no {key!r}, needed for task {task!r}")
    if task == "vqa":
        return render_diagnoses(sample[key])
    return render_findings((f["label"], f["box"]) for f in sample[key])


@dataclass
class Parsed:
    """What a generation says: boxes (0..100, text order), labels (ALL_LABELS order), and the rest.

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


# One named group per label (L<index into ALL_LABELS>), longest first so no name shadows a longer one.
_LABELS = "|".join(
    f"(?P<L{i}>{_words(name)})" for i, name in sorted(enumerate(ALL_LABELS), key=lambda x: -len(x[1]))
)
_LABEL_PATTERN = rf"(?<!\w)(?:{_LABELS})s?(?!\w)"
_LABEL_RE = re.compile(_LABEL_PATTERN, re.IGNORECASE)
_BOX_RE = re.compile(r"\{[^{}]*\}")
_COORDS_RE = re.compile(r"\s*" + r"\s*".join([r"<\s*([0-9]{1,3})\s*>"] * 4) + r"\s*")
_PHRASES = "|".join(_words(p) for p in (NO_DIAGNOSIS_ANSWER[:-1], LOCAL_PREFIX, GLOBAL_PREFIX, NO_FINDINGS_PREFIX))
_TOKEN_RE = re.compile(
    rf"(?P<entry><p>(?P<name>[^<>{{}}]*)</p>(?P<boxes>(?:\s*(?:(?:<delim>|,)\s*)?{_BOX_RE.pattern})*))"
    rf"|(?P<box>{_BOX_RE.pattern})"
    rf"|(?P<phrase>(?<!\w)(?:{_PHRASES})(?!\w))"
    rf"|{_LABEL_PATTERN}",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"[,.;:]")


def _label_of(match: re.Match[str]) -> str:
    return ALL_LABELS[int(match.lastgroup[1:])]  # type: ignore[index]


def _parse_box(text: str) -> Box | None:
    m = _COORDS_RE.fullmatch(text[1:-1])
    if m is None:
        return None
    x0, y0, x1, y1 = (int(g) for g in m.groups())
    if max(x0, y0, x1, y1) > 100:
        return None
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def parse(text: str) -> Parsed:
    """Read a generation; never raises. Anything not understood is kept, in order, in `unparsed`."""
    out = Parsed()
    mentioned: set[str] = set()

    def gap(fragment: str) -> None:
        for piece in _SEPARATOR.split(fragment):
            piece = piece.strip()
            if piece and piece.lower() != "and":
                out.unparsed.append(piece)

    pos = 0
    for m in _TOKEN_RE.finditer(text):
        gap(text[pos : m.start()])
        pos = m.end()
        if m.group("entry") is not None:
            label_match = _LABEL_RE.fullmatch(m.group("name").strip())
            if label_match is None:
                out.unparsed.append(m.group())
                continue
            label = _label_of(label_match)
            mentioned.add(label)
            boxes = list(_BOX_RE.finditer(text, m.start("boxes"), m.end("boxes")))
            if label not in LOCAL_LABELS or not boxes:
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
        elif m.group("phrase") is None:
            mentioned.add(_label_of(m))
    gap(text[pos:])
    out.labels = [name for name in ALL_LABELS if name in mentioned]
    return out
