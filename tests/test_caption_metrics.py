"""Captioning metrics (pycocoevalcap, real Java): extremes, and a small case computed independently."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from engine.evaluation.caption_metrics import METRIC_NAMES, CaptionScorer, require_java
from modules.errors import InputError

HYPOTHESES = {"a": "a red circle moves left", "b": "a blue square moves up"}
REFERENCES = {"a": ["a red circle moves to the left", "the red circle slides left"],
              "b": ["a blue square is moving upwards"]}


@pytest.fixture(scope="module")
def scorer():
    with CaptionScorer() as shared:  # one METEOR process (about 10 s to start) for the module
        yield shared


def test_java_is_found():
    assert "version" in require_java()


def test_missing_java_is_reported_with_what_to_install(monkeypatch):
    monkeypatch.setattr("engine.evaluation.caption_metrics.shutil.which", lambda name: None)
    with pytest.raises(InputError, match="apt-get install -y default-jre-headless"):
        require_java()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["standard", "original"])
def test_identical_captions_score_the_maximum_and_disjoint_ones_zero(protocol, scorer):
    references = {"v1": ["a red circle moves to the left"], "v2": ["the green square slides upwards"],
                  "v3": ["a white cross is moving downwards"]}
    same = scorer.score({key: refs[0] for key, refs in references.items()}, references, protocol)
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert same[name] == pytest.approx(1.0)
    assert same["CIDEr"] == pytest.approx(10.0)  # cosine 1 for every n-gram order, times 10
    assert same["METEOR"] > 0.9
    disjoint = scorer.score({"v1": "purple diamonds jump high", "v2": "dogs bark loudly today",
                               "v3": "nothing here at all"}, references, protocol)
    for name in METRIC_NAMES:
        assert disjoint[name] == pytest.approx(0.0, abs=1e-6), name
    partial = scorer.score({"v1": "a red circle", "v2": "the green square", "v3": "a white cross"}, references,
                             protocol)
    assert 0 < partial["METEOR"] < same["METEOR"]


@pytest.mark.slow
def test_bleu_on_a_hand_computed_case(scorer):
    """Unigrams: video a matches 5 of 5, video b 3 of 5 (not "moves", not "up") -> p1 = 0.8. Bigrams: 3 of 4 and
    2 of 4 -> p2 = 0.625. Candidate length 10; closest reference lengths 5 and 6 -> r = 11, BP = exp(1 - 11/10)."""
    scores = scorer.score(HYPOTHESES, REFERENCES)
    brevity = math.exp(1 - 11 / 10)
    assert scores["Bleu_1"] == pytest.approx(0.8 * brevity, abs=1e-6)
    assert scores["Bleu_2"] == pytest.approx(brevity * math.sqrt(0.8 * 0.625), abs=1e-6)


def cider_d(hypotheses: dict[str, str], references: dict[str, list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D as defined by Vedantam et al. (with the clipping and length penalty of the coco-caption code)."""

    def ngrams(words: list[str], n: int) -> Counter:
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    keys = sorted(hypotheses)
    document_frequency: Counter = Counter()
    for key in keys:
        document_frequency.update({gram for ref in references[key] for n in range(1, 5)
                                   for gram in ngrams(ref.split(), n)})
    log_documents = math.log(len(keys))

    def vector(words: list[str], n: int) -> dict:
        return {gram: count * (log_documents - math.log(max(1.0, document_frequency[gram])))
                for gram, count in ngrams(words, n).items()}

    total = 0.0
    for key in keys:
        hyp = hypotheses[key].split()
        per_reference = []
        for ref in references[key]:
            ref_words = ref.split()
            penalty = math.exp(-((len(hyp) - len(ref_words)) ** 2) / (2 * sigma**2))
            similarity = 0.0
            for n in range(1, 5):
                g_hyp, g_ref = vector(hyp, n), vector(ref_words, n)
                dot = sum(min(value, g_ref.get(gram, 0.0)) * g_ref.get(gram, 0.0) for gram, value in g_hyp.items())
                norms = math.sqrt(sum(v * v for v in g_hyp.values())) * math.sqrt(sum(v * v for v in g_ref.values()))
                similarity += (dot / norms if norms else 0.0) * penalty
            per_reference.append(similarity / 4)
        total += 10.0 * sum(per_reference) / len(per_reference)
    return total / len(keys)


def test_cider_agrees_with_an_independent_implementation(scorer):
    hypotheses = {**HYPOTHESES, "c": "a white cross moves down"}
    references = {**REFERENCES, "c": ["a white cross moves downwards", "the white cross slides down"]}
    scores = scorer.score(hypotheses, references, protocol="original")
    assert scores["CIDEr"] == pytest.approx(cider_d(hypotheses, references), abs=1e-6)
    assert scores["CIDEr"] > 0.5


def test_the_standard_protocol_removes_punctuation_and_case_and_the_original_does_not(scorer):
    references = {"v1": ["a red circle moves to the left"], "v2": ["the green square slides upwards"]}
    hypotheses = {"v1": "A red circle moves to the left.", "v2": "The green square slides upwards!"}
    assert scorer.score(hypotheses, references, "standard")["Bleu_4"] == pytest.approx(1.0)
    assert scorer.score(hypotheses, references, "original")["Bleu_4"] < 0.9


def test_empty_hypotheses_score_zero_without_breaking_meteor(scorer):
    references = {"v1": ["a red circle moves to the left"], "v2": ["the green square slides upwards"]}
    scores = scorer.score({"v1": "", "v2": "the green square slides upwards"}, references)
    assert 0 < scores["METEOR"] < 1 and 0 < scores["CIDEr"] < 10


def test_mismatched_videos_are_an_error(scorer):
    with pytest.raises(ValueError, match="different videos"):
        scorer.score({"a": "x"}, {"b": ["x"]})


@pytest.mark.slow
def test_a_fresh_scorer_gives_the_long_lived_scorer_s_numbers(scorer):
    with CaptionScorer() as fresh:
        assert fresh.score(HYPOTHESES, REFERENCES, "original") == scorer.score(HYPOTHESES, REFERENCES, "original")
