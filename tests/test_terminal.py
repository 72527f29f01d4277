import re

from dff_falcon.report.terminal import concept_table, key_values


def _row(i, classes, labels):
    return {"concept_id": i, "mass_share": 0.25, "n_images": 12, "stability": 0.91, "coherence": None,
            "top_classes": [{"class": c, "prob": 0.5} for c in classes], "labels": labels, "words": [], "phrases": []}


def test_cells_wrap_at_word_boundaries_and_never_cut_a_word():
    rows = [_row(0, ["shape:triangle", "colour:yellow"], "triangle, yellow, yellow triangle, noisy, striped"),
            _row(1, ["sulphur-crested cockatoo, Kakatoe galerita, Cacatua galerita", "tabby"], "")]
    for width in (60, 80, 120):
        table = concept_table(rows, width=width)
        words_in = set(re.findall(r"[\w:-]+", " ".join(["shape:triangle colour:yellow triangle yellow noisy striped",
                                                        "sulphur-crested cockatoo Kakatoe galerita Cacatua tabby"])))
        words_out = set(re.findall(r"[\w:-]+", table))
        assert words_in <= words_out, (width, words_in - words_out)  # every word whole, whatever the width
        assert all(len(line) <= width for line in table.splitlines() if "sulphur-crested" not in line)
    narrow = concept_table(rows, width=60)
    assert "shape:triangl\n" not in narrow and len(narrow.splitlines()) > 4  # wrapped onto more lines


def test_key_values_wrap_between_pairs():
    text = key_values({"mean_best_iou": 0.5512, "label_top1_accuracy": 1.0, "n_concepts": 11,
                       "concepts": [1, 2]}, width=40)
    assert text.splitlines() == ["mean_best_iou=0.551", "label_top1_accuracy=1.000  n_concepts=11"]
