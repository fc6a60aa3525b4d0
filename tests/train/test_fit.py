import pytest
import torch

from backdoorlab.config import to_dict
from backdoorlab.data import load_dataset
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import build_model
from backdoorlab.train import Hook, TrainConfig, accuracy, fit
from backdoorlab.train.augment import color_jitter, random_crop, random_hflip


def _model(b):
    torch.manual_seed(0)
    return build_model("small-cnn", b.info.num_classes, b.info.channels, b.info.mean, b.info.std)


def test_fit_learns_digits_and_is_deterministic():
    b = load_dataset("digits")
    cfg = TrainConfig(epochs=15, batch_size=128, lr=0.1)
    m0 = _model(b)
    before = {k: v.clone() for k, v in m0.state_dict().items()}
    r1 = fit(m0, b.train, cfg, generator=torch.Generator().manual_seed(3), device="cpu", eval_data=b.test)
    r2 = fit(m0, b.train, cfg, generator=torch.Generator().manual_seed(3), device="cpu")
    for k, v in m0.state_dict().items():  # fit returns a new model, the input is unchanged
        assert torch.equal(v, before[k])
    for (k, v1), v2 in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
        assert torch.equal(v1, v2), k
    assert accuracy(r1.model, b.test, device="cpu") >= 0.9
    assert len(r1.history) == 15 and r1.history[-1]["test_acc"] >= 0.9
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]
    r3 = fit(m0, b.train, cfg, generator=torch.Generator().manual_seed(4), device="cpu")
    assert not torch.equal(r3.model.head.weight, r1.model.head.weight)


def test_hooks_are_called_in_order():
    b = load_dataset("digits")
    calls = []

    class Spy(Hook):
        def on_fit_start(self, state):
            calls.append("start")

        def batch(self, state, x, y):
            calls.append("batch")
            return x, torch.zeros_like(y)  # relabel everything: the model must learn class 0

        def loss(self, state, x, y, logits, loss):
            calls.append("loss")
            return loss

        def after_step(self, state):
            calls.append("step")

        def on_epoch_end(self, state, metrics):
            metrics["spy"] = 1.0

    r = fit(_model(b), b.train, TrainConfig(epochs=2, batch_size=512), generator=torch.Generator(),
            hooks=[Spy()], device="cpu")
    assert calls[:4] == ["start", "batch", "loss", "step"]
    assert r.history[-1]["spy"] == 1.0
    assert accuracy(r.model, b.test, device="cpu") < 0.2  # it learned the hook's labels


def test_augmentations_are_seeded_and_shape_preserving():
    x = torch.rand(16, 3, 32, 32)
    a = random_crop(x, 4, torch.Generator().manual_seed(0))
    b = random_crop(x, 4, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    f = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(f, x.flip(3))
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_color_jitter_follows_torchvision_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 0.5  # dark enough that brightness <= 1.4 never clamps
    out = color_jitter(x, 0.4, 0.0, g)
    ratio = (out / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # one factor per image
    f = ratio[:, 0]
    assert f.min() >= 0.6 - 1e-6 and f.max() <= 1.4 + 1e-6 and f.std() > 0.1
    assert torch.equal(out, color_jitter(x, 0.4, 0.0, torch.Generator().manual_seed(0)))  # seeded
    # contrast blends with the image's mean luma: the luma mean survives unclamped
    y = 0.25 + 0.5 * torch.rand(64, 3, 8, 8)
    yc = color_jitter(y, 0.0, 0.2, torch.Generator().manual_seed(1))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((yc * luma).sum(1).mean((1, 2)), (y * luma).sum(1).mean((1, 2)), atol=1e-5)
    assert not torch.allclose(yc, y)
    # saturated pixels clamp to [0, 1]; a strength of 1 can scale down to black
    w = color_jitter(torch.ones(32, 1, 4, 4), 1.0, 1.0, torch.Generator().manual_seed(2))
    assert w.min() >= 0 and w.max() <= 1 and w.amin((1, 2, 3)).min() < 0.5
    assert torch.equal(color_jitter(x, 0.0, 0.0, g), x)


def test_jitter_enters_the_config_only_when_on():
    """Settings added later (``OMIT_DEFAULT``) leave every existing cache key and run id as it was."""
    assert "brightness" not in to_dict(TrainConfig()) and "contrast" not in to_dict(TrainConfig())
    assert to_dict(TrainConfig(brightness=0.4))["brightness"] == 0.4
    b = load_dataset("digits")
    cfg = TrainConfig(epochs=2, batch_size=256, brightness=0.4, contrast=0.4)
    r1 = fit(_model(b), b.train, cfg, generator=torch.Generator().manual_seed(0), device="cpu")
    r2 = fit(_model(b), b.train, cfg, generator=torch.Generator().manual_seed(0), device="cpu")
    r0 = fit(_model(b), b.train, TrainConfig(epochs=2, batch_size=256), generator=torch.Generator().manual_seed(0),
             device="cpu")
    assert torch.equal(r1.model.head.weight, r2.model.head.weight)
    assert not torch.equal(r1.model.head.weight, r0.model.head.weight)


def test_bad_train_settings():
    b = load_dataset("digits")
    for bad in (-0.1, 1.5, "0.4", True):
        with pytest.raises(BackdoorLabError, match="brightness must be a number in"):
            fit(_model(b), b.train, TrainConfig(brightness=bad), generator=torch.Generator())
    with pytest.raises(BackdoorLabError, match="contrast"):
        fit(_model(b), b.train, TrainConfig(contrast=2), generator=torch.Generator())
    with pytest.raises(BackdoorLabError, match="schedule"):
        fit(_model(b), b.train, TrainConfig(schedule="step"), generator=torch.Generator())
    with pytest.raises(BackdoorLabError, match="batch_size"):
        fit(_model(b), b.train, TrainConfig(batch_size=0), generator=torch.Generator())


def test_a_hook_may_install_the_optimizer_and_enlarge_the_batch():
    """Two-phase attacks double the batch (x ∪ trigger(x)) and may train with their paper's Adam:
    fit() steps the optimiser a hook installs (with the schedule's lr) and reports accuracy over
    the samples the loss saw, so it stays within [0, 1]."""
    b = load_dataset("digits")
    seen = {}

    class Doubling(Hook):
        def on_fit_start(self, state):
            state.optimizer = torch.optim.Adam(state.model.parameters(), lr=1.0)
            seen["opt"] = state.optimizer

        def batch(self, state, x, y):
            return torch.cat([x, x.flip(-1)]), torch.cat([y, y])

        def after_step(self, state):
            seen["lr"] = state.optimizer.param_groups[0]["lr"]
            assert state.optimizer is seen["opt"]

    cfg = TrainConfig(epochs=2, batch_size=256, lr=1e-3, schedule="cosine", warmup=0.0)
    r = fit(_model(b), b.train, cfg, generator=torch.Generator().manual_seed(0), hooks=[Doubling()], device="cpu")
    assert 0 < seen["lr"] < 1e-3  # the schedule drove the hook's optimiser, not Adam's own lr=1.0
    assert all(0.0 <= h["train_acc"] <= 1.0 for h in r.history), r.history


def test_a_diverging_run_fails_with_one_line():
    b = load_dataset("digits")
    cfg = TrainConfig(epochs=1, batch_size=256, lr=1e30, schedule="cosine", warmup=0.0)
    with pytest.raises(BackdoorLabError, match="training diverged in epoch 1"):
        fit(_model(b), b.train, cfg, generator=torch.Generator().manual_seed(0), device="cpu")
