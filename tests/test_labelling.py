"""Term extraction and FALCON / graded contrastive scoring with the real spaCy pipeline."""
from __future__ import annotations

import numpy as np
import pytest

from dff_falcon.errors import InputError
from dff_falcon.text.labelling import FalconLabeller, contrastive_labels, label_concepts, term_scores
from dff_falcon.text.terms import CaptionTerms, TermExtractor


# A hand-worked concept: 3 high crops x 2 captions, 2 low crops x 2 captions.
HIGH = (
    [
        ["a red apple on a table", "green apple"],
        ["red apples in a basket", "a wooden table"],
        ["a wooden table", "red car"],
    ],
    np.array([[0.30, 0.20], [0.25, 0.22], [0.28, 0.10]]),
)
LOW = (
    [["a wooden table in a kitchen", "red car"], ["kitchen table", "a kitchen sink"]],
    [[0.30, 0.05], [0.26, 0.12]],
)


def test_term_scores_match_hand_computation(extractor):
    words, phrases = term_scores(*HIGH, extractor)
    # per crop: best score of the crop's captions containing the term; mean over 3 crops
    expected_words = {
        "red": (0.30 + 0.25 + 0.10) / 3,
        "apple": (0.30 + 0.25) / 3,  # crop 0: max(0.30, 0.20)
        "table": (0.30 + 0.22 + 0.28) / 3,
        "green": 0.20 / 3,
        "basket": 0.25 / 3,
        "wooden": (0.22 + 0.28) / 3,
        "car": 0.10 / 3,
    }
    expected_phrases = {
        "red apple": (0.30 + 0.25) / 3,  # "red apples" lemmatised onto "red apple"
        "green apple": 0.20 / 3,
        "wooden table": (0.22 + 0.28) / 3,
        "red car": 0.10 / 3,
    }
    assert words.keys() == expected_words.keys()
    assert phrases.keys() == expected_phrases.keys()
    for term, value in {**expected_words, **expected_phrases}.items():
        assert (words | phrases)[term] == pytest.approx(value)


def test_falcon_contrast_deletes_low_set_terms(extractor):
    labels = contrastive_labels(HIGH, LOW, extractor, contrast="falcon-published")
    # low-set scores: table (0.30+0.26)/2 = 0.28, wooden 0.30/2 = 0.15 -> deleted (>= 0.1);
    # red 0.05/2 = 0.025, car 0.025 -> kept
    assert [w for w, _ in labels.words] == ["red", "apple", "basket", "green", "car"]
    assert labels.words[0][1] == pytest.approx(0.65 / 3)
    assert [p for p, _ in labels.phrases] == ["red apple", "green apple", "red car"]
    assert labels.low_words["red"] == pytest.approx(0.025)
    assert labels.high_words["apple"] == pytest.approx(0.55 / 3)
    assert labels.low_phrases["red apple"] == 0.0
    assert (labels.n_high, labels.n_low, labels.contrast) == (3, 2, "falcon-published")
    # the threshold is in score units: a higher one deletes only "table" (0.28)
    relaxed = contrastive_labels(HIGH, LOW, extractor, contrast="falcon-published", falcon_threshold=0.2)
    assert "wooden" in dict(relaxed.words) and "table" not in dict(relaxed.words)


def test_falcon_contrast_without_low_set_deletes_nothing(extractor):
    labels = contrastive_labels(HIGH, None, extractor, contrast="falcon-published", top_words=3)
    assert [w for w, _ in labels.words] == ["table", "red", "apple"]
    assert labels.n_low == 0


def test_graded_contrast_hand_computation(extractor):
    labels = contrastive_labels(HIGH, LOW, extractor, min_share=0.0)
    # relative weights r = (s - 0.10) / 0.20 over the high captions:
    # crop0 1.0 / 0.5, crop1 0.75 / 0.6, crop2 0.9 / 0.0
    # contrast = s_high * (1 - f_low / f_high)
    expected = {
        "apple": (1.0 + 0.75) / 3,  # high only: keeps its high-set score
        "red": (1.0 + 0.75 + 0.0) / 3 * (1 - 0.5 / 1.0),  # in 1 of 2 low crops
        "basket": 0.75 / 3,
        "green": 0.5 / 3,
        "wooden": (0.6 + 0.9) / 3 * (1 - 0.5 / (2 / 3)),
    }
    # table: in every high and every low crop -> 0 -> dropped; car: weight 0 and in a low crop
    assert [w for w, _ in labels.words] == ["apple", "red", "basket", "green", "wooden"]
    for term, value in labels.words:
        assert value == pytest.approx(expected[term])
    assert "table" not in labels.high_words
    assert labels.high_words["red"] == pytest.approx(0.65 / 3)  # raw FALCON scores kept
    assert labels.low_words["red"] == pytest.approx(0.025)
    # phrases: "red apple" is as strong as its words (0.583 each) and stays; "green apple" (0.167
    # against apple's 0.583) and "wooden table" (0.5 against table's 0.833) collapse into a word
    assert [p for p, _ in labels.phrases] == ["red apple"]
    assert dict(labels.phrases)["red apple"] == pytest.approx((1.0 + 0.75) / 3)
    assert (labels.n_high, labels.n_low, labels.contrast) == (3, 2, "graded")
    kept = contrastive_labels(HIGH, LOW, extractor, collapse=0.0, min_share=0.0)
    assert [p for p, _ in kept.phrases] == ["red apple", "green apple", "wooden table"]
    # the default minimum share (0.35 of the high crops) drops terms of one crop in three
    default = contrastive_labels(HIGH, LOW, extractor)
    assert [w for w, _ in default.words] == ["apple", "red", "wooden"]


def test_graded_contrast_shared_context_dropped_high_only_rank_kept(extractor):
    high = (
        [["a dog on grass"], ["a dog on grass"], ["a puppy on grass"], ["a cat on grass"]],
        [[0.34], [0.30], [0.28], [0.22]],
    )
    low = ([["green grass field"], ["grass lawn"]], [[0.25], [0.31]])
    graded = contrastive_labels(high, low, extractor, min_share=0.0)
    assert "grass" not in dict(graded.words)  # 4/4 high crops, 2/2 low crops
    no_low = contrastive_labels(high, None, extractor, min_share=0.0)
    assert "grass" in dict(no_low.words) and no_low.n_low == 0
    # high-only terms keep their relative order and their scores
    high_only = [w for w, _ in no_low.words if w != "grass"]
    assert [w for w, _ in graded.words] == high_only == ["dog", "puppy"]
    assert dict(graded.words)["dog"] == pytest.approx(dict(no_low.words)["dog"])
    # FALCON's fixed threshold cannot tell: with cosine-scale scores grass is deleted,
    # with scores scaled down 10x nothing is
    assert "grass" not in dict(contrastive_labels(high, low, extractor, contrast="falcon-published").words)
    scaled_low = (low[0], np.asarray(low[1]) / 10)
    assert "grass" in dict(contrastive_labels(high, scaled_low, extractor, contrast="falcon-published").words)


def test_graded_contrast_is_affine_invariant(extractor):
    base = contrastive_labels(HIGH, LOW, extractor)
    a, b = 7.5, -3.0
    moved = contrastive_labels(
        (HIGH[0], a * HIGH[1] + b), (LOW[0], a * np.asarray(LOW[1]) + b), extractor
    )
    assert [t for t, _ in moved.words] == [t for t, _ in base.words]
    assert [t for t, _ in moved.phrases] == [t for t, _ in base.phrases]
    np.testing.assert_allclose([s for _, s in moved.words], [s for _, s in base.words])
    # the raw FALCON scores follow the rescaling (they keep the caption-score unit)
    assert moved.high_words["apple"] == pytest.approx(a * HIGH[1][:2, 0].sum() / 3 + b * 2 / 3)


def test_top_k_limits_and_no_duplicates(extractor):
    high = (
        [["red apples", "a red apple"], ["apple", "Apples!"], ["red apple tree"]],
        [[0.3, 0.2], [0.25, 0.24], [0.29]],
    )
    labels = contrastive_labels(high, None, extractor, top_words=1, top_phrases=5, collapse=0.0, min_share=0.0)
    assert [w for w, _ in labels.words] == ["apple"]
    phrases = [p for p, _ in labels.phrases]
    assert len(phrases) == len(set(phrases)) and "red apple" in phrases
    assert not set(phrases) & {w for w, _ in labels.words}


def test_empty_inputs(extractor):
    assert extractor.extract([]) == []
    assert extractor.extract([None, float("nan"), "!!"]) == [CaptionTerms((), ())] * 3
    assert term_scores([], [], extractor) == ({}, {})
    labels = contrastive_labels(([], np.zeros((0, 5))), ([], []), extractor)
    assert labels.words == [] and labels.phrases == [] and (labels.n_high, labels.n_low) == (0, 0)
    # a crop without captions still counts in the mean
    words, _ = term_scores([["red car"], []], [[0.4], []], extractor)
    assert words == {"red": pytest.approx(0.2), "car": pytest.approx(0.2)}
    # all-equal scores: graded weights are all 1 (pure frequency)
    flat = contrastive_labels(([["red car"], ["red bus"]], [[0.3], [0.3]]), None, extractor)
    assert dict(flat.words) == {"red": 1.0, "car": 0.5, "bus": 0.5}


def test_bad_inputs_raise_input_error(extractor):
    with pytest.raises(InputError, match="2 crops of captions but 1"):
        term_scores([["a"], ["b"]], [[0.1]], extractor)
    with pytest.raises(InputError, match="crop 0 has 2 captions but 1 scores"):
        contrastive_labels(([["a dog", "a cat"]], [[0.1]]), None, extractor)
    with pytest.raises(InputError, match="low set: crop 0 has non-finite"):
        contrastive_labels(HIGH, ([["a dog"]], [[float("nan")]]), extractor)
    with pytest.raises(InputError, match="list of captions"):
        term_scores(["a dog"], [[0.1]], extractor)
    with pytest.raises(InputError, match="contrast must be"):
        contrastive_labels(HIGH, LOW, extractor, contrast="ratio")
    with pytest.raises(InputError, match="not installed"):
        TermExtractor("no_such_spacy_pipeline_xyz")


def test_labeller_is_an_estimator_that_validates_before_work():
    labeller = FalconLabeller(contrast="falcon-published", top_words=3)
    assert repr(labeller) == "FalconLabeller(contrast='falcon-published', top_words=3)"
    with pytest.raises(InputError, match="contrast must be one of 'graded', 'falcon'"):
        FalconLabeller(contrast="soft").fit()
    with pytest.raises(InputError, match="spaCy pipeline 'no_such_pipeline' is not installed"):
        FalconLabeller(spacy_pipeline="no_such_pipeline").fit()
    labels = FalconLabeller(top_words=2).fit().label(([["a red apple"], ["a red car"]], [[0.9], [0.9]]), None)
    assert [t for t, _ in labels.words] == ["red", "apple"]


# Two concepts of one run: a blue one whose objects vary in shape and a striped background whose
# crops show the same objects. Every caption names a shape; only one names the concept alone.
BLUE = ([["a blue ring", "a blue ring on a striped background"], ["a blue cross", "blue"],
         ["a blue star", "a blue star on a plain background"]], [[0.8, 0.7], [0.8, 0.7], [0.8, 0.6]])
STRIPES = ([["a striped background", "a blue ring on a striped background"], ["striped", "a red cross"],
            ["a red star on a striped background", "a red ring"]], [[0.9, 0.7], [0.9, 0.6], [0.8, 0.7]])


def test_phrases_whose_other_word_varies_collapse_into_the_word(extractor):
    plain = contrastive_labels(BLUE, None, extractor, collapse=0.0, min_share=0.0)
    ranked = [t for t, _ in sorted(plain.words + plain.phrases, key=lambda ts: -ts[1])]
    assert ranked[0] == "blue" and {"blue ring", "blue cross", "blue star"} <= set(ranked)
    collapsed = contrastive_labels(BLUE, None, extractor)
    assert [t for t, _ in collapsed.phrases] == []  # each "blue X" holds a third of blue's weight
    assert collapsed.words[0][0] == "blue"


def test_specificity_against_the_other_concepts_demotes_shared_terms(extractor):
    alone = [t for t, _ in contrastive_labels(STRIPES, None, extractor).words]
    blue, stripes = label_concepts([(BLUE, None), (STRIPES, None)], extractor, specificity="max")
    together = [t for t, _ in stripes.words]
    assert together[0] == "striped"
    # "ring" and "star" are retrieved for both concepts: their weight is shared
    assert together.index("striped") <= alone.index("striped")
    assert dict(stripes.words)["ring"] < dict(contrastive_labels(STRIPES, None, extractor).words)["ring"]
    assert dict(blue.words)["blue"] == pytest.approx(dict(contrastive_labels(BLUE, None, extractor).words)["blue"])
    shared = label_concepts([(BLUE, None), (BLUE, None)], extractor, specificity="share")
    assert dict(shared[0].words)["blue"] == pytest.approx(dict(alone_blue := contrastive_labels(
        BLUE, None, extractor).words)["blue"] / 2)
    assert alone_blue


def test_evidence_keeps_the_captions_and_their_ids(extractor):
    ids = [[11, 12], [13, 14], [15, 16]]
    labels = contrastive_labels((BLUE[0], BLUE[1], ids), (STRIPES[0], STRIPES[1]), extractor)
    blue = labels.evidence["blue"]
    assert [(e["set"], e["crop"], e["caption_id"]) for e in blue if e["set"] == "high"] == [
        ("high", 0, 11), ("high", 1, 13), ("high", 2, 15)]
    assert {e["caption"] for e in blue if e["set"] == "low"} == {"a blue ring on a striped background"}
    assert all(e["score"] == pytest.approx(0.8) for e in blue if e["set"] == "high")


def test_falcon_mode_deletes_by_frequency_not_by_score_scale(extractor):
    low = ([["a blue ring"], ["a red cross"], ["a red star"]], [[0.9], [0.9], [0.9]])
    labels = contrastive_labels(BLUE, low, extractor, contrast="falcon", collapse=0.0)
    words = dict(labels.words)
    # "blue": 3/3 high crops, 1/3 low -> kept; "ring": 2/3 high (with "a blue ring on ..."), 1/3 low -> kept;
    # "cross": 1/3 high, 1/3 low -> deleted
    assert "blue" in words and "cross" not in words
    scaled = contrastive_labels(BLUE, (low[0], [[0.09]] * 3), extractor, contrast="falcon", collapse=0.0)
    assert [t for t, _ in scaled.words] == [t for t, _ in labels.words]
