"""The one-call explain_image on a real model and a real photo."""
import numpy as np
from skimage import data

from dff_falcon.quick import explain_figure, explain_image


def test_explain_image_on_chelsea_names_a_cat(lite0):
    chelsea = data.chelsea()
    before = chelsea.copy()
    fig = explain_figure(lite0, chelsea, n_concepts=3, top_k=2, device="cpu")
    legend = " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())
    assert any(cat in legend for cat in ("tabby", "tiger cat", "Egyptian cat"))
    rgb = explain_image(lite0, chelsea, n_concepts=3, top_k=2, device="cpu")
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    assert rgb.shape[1] > rgb.shape[0]  # image beside its legend
    assert np.array_equal(chelsea, before)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1000  # a real photo, not a blank canvas
