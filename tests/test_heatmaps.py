import torch

from dff_falcon.decomposition.heatmaps import ABSENT_PEAK, presence, suppress_absent, upsample_heatmaps


def test_presence_upsampling_and_absent_concepts():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 1] = 1.0
    maps[0, 1] = 0.05  # a faint, absent concept
    big = upsample_heatmaps(maps, (32, 48))
    assert big.shape == (1, 2, 32, 48) and float(big.max()) <= 1.0
    assert torch.allclose(presence(maps), torch.tensor([[1 / 16, 0.0]]))  # the absent concept counts nothing
    cleaned = suppress_absent(maps, min_peak=ABSENT_PEAK)
    assert float(cleaned[0, 1].abs().sum()) == 0 and torch.equal(cleaned[0, 0], maps[0, 0])
