"""Captioning metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (docs/method.md §7b).

Protocols:
* "standard" (default): references and hypotheses go through pycocoevalcap's PTB tokenizer (lower-cased,
  punctuation removed), as every published captioning number since COCO;
* "original": the T2VLP script's scoring, without the PTB tokenizer: the caller passes the hypotheses as the
  BPE decoder wrote them and the references re-decoded from their token ids.

METEOR and the PTB tokenizer are Java programs shipped inside pycocoevalcap: `require_java` checks for a Java
runtime at start-up, before any training.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from modules.errors import InputError

CAPTION_PROTOCOLS = ("standard", "original")
METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = ("install a Java runtime (Debian/Ubuntu: sudo apt-get install -y default-jre-headless; conda: "
             "conda install -c conda-forge openjdk) and make sure `java` is on PATH")


def require_java() -> str:
    """The `java -version` line; an InputError naming what to install when Java is missing or broken."""
    java = shutil.which("java")
    if java is None:
        raise InputError(f"captioning metrics need Java (METEOR and the PTB tokenizer of pycocoevalcap): {JAVA_HINT}")
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise InputError(f"`java -version` failed ({error}): {JAVA_HINT}") from error
    if result.returncode != 0:
        raise InputError(f"`java -version` exited {result.returncode}: {result.stderr.strip()[:200]}; {JAVA_HINT}")
    return (result.stderr or result.stdout).strip().splitlines()[0]


class CaptionScorer:
    """Scores captions with pycocoevalcap. One METEOR Java process (about 10 s to start) serves every call until
    `close()`; use it as a context manager."""

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop METEOR's Java process now instead of whenever pycocoevalcap's `__del__` runs."""
        if self._meteor is None:
            return
        process, lock = self._meteor.meteor_p, self._meteor.lock
        with lock:
            process.stdin.close()
            process.kill()
            process.wait()
        self._meteor = None

    def score(
        self, hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], protocol: str = "standard"
    ) -> dict[str, float]:
        """Corpus scores (fractions, as pycocoevalcap returns them) of one hypothesis per video against its
        references. Both mappings must have the same keys; every video needs at least one reference."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if self._meteor is None:
            raise RuntimeError("this CaptionScorer is closed")
        gts, result = _prepared(hypotheses, references, protocol)
        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, result, verbose=0)
        scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
        scores["METEOR"] = float(self._meteor.compute_score(gts, result)[0])
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, result)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, result)[0])
        return scores


_shared: CaptionScorer | None = None


def shared_scorer() -> CaptionScorer:
    """One scorer for the whole process (a training run evaluates many times, and METEOR's Java process takes ~10 s to start),
    closed when the interpreter exits."""
    global _shared
    if _shared is None:
        _shared = CaptionScorer()
        atexit.register(_shared.close)
    return _shared


def _prepared(
    hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], protocol: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(references, hypotheses) as pycocoevalcap's scorers take them, tokenised by the protocol."""
    if protocol not in CAPTION_PROTOCOLS:
        raise ValueError(f"protocol must be one of {CAPTION_PROTOCOLS}, got {protocol!r}")
    if set(hypotheses) != set(references):
        raise ValueError(f"hypotheses and references cover different videos "
                         f"({len(set(hypotheses) ^ set(references))} differ)")
    if not hypotheses:
        raise ValueError("no captions to score")
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} video(s) have no reference caption, e.g. {empty[:3]}")
    keys = sorted(hypotheses)
    if protocol == "standard":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        result = tokenizer.tokenize({key: [{"caption": hypotheses[key]}] for key in keys})
        gts = tokenizer.tokenize({key: [{"caption": ref} for ref in references[key]] for key in keys})
    else:
        result = {key: [hypotheses[key]] for key in keys}
        gts = {key: list(references[key]) for key in keys}
    # METEOR's Java process reads one line per caption: keep every text on one line, never empty.
    result = {key: [_one_line(text) for text in texts] for key, texts in result.items()}
    gts = {key: [_one_line(text) for text in texts] for key, texts in gts.items()}
    return gts, result


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if text else "."  # an empty caption scores zero; METEOR cannot read an empty line
