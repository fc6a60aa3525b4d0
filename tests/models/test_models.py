import pytest
import torch

from backdoorlab.models import DEFAULT_MODEL, MODELS, build_model

PARAMS = {"small-cnn": (0.3e6, 1.0e6), "preact-resnet18": (11.0e6, 11.3e6), "vgg16-bn": (14.6e6, 15.0e6),
          "mobilenetv2": (2.2e6, 2.4e6)}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_runs_and_normalises_inside(name):
    torch.manual_seed(0)
    m = build_model(name, 10, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        feats = m.forward_features(x)
    assert out.shape == (2, 10) and feats.shape == (2, m.head.in_features)
    torch.testing.assert_close(m.normalize(x), (x - 0.5) / 0.25)
    n = sum(p.numel() for p in m.parameters())
    lo, hi = PARAMS[name]
    assert lo <= n <= hi, n


def test_default_model_takes_grey_and_small_inputs():
    assert DEFAULT_MODEL == "small-cnn"
    m = build_model(DEFAULT_MODEL, 10, 1, (0.3,), (0.37,)).eval()
    assert m(torch.rand(3, 1, 8, 8)).shape == (3, 10)
