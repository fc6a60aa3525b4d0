"""A test-only attack that exercises the attack interface's two hand-offs (issue 25): a declared
asset (built by the pipeline from the attacker's data, cached) and a trigger learned during
training (stored with the trained model). Registered on import; tests unregister it."""

from __future__ import annotations

import torch

from backdoorlab.attacks.base import ASSETS, ATTACKS, AssetContext, Attack
from backdoorlab.train.fit import FitState, Hook

BUILDS: list[int] = []  # asset builds in this process


def toy_mean_image(ctx: AssetContext, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """The mean training image, scaled: proves the builder sees the attacker's training split."""
    BUILDS.append(len(ctx.train))
    return {"mean": ctx.train.float().mean(0) * scale, "n": torch.tensor(len(ctx.train))}


class ToyLearned(Attack):
    """Trigger = asset image + a pattern moved by training (one step per optimiser step)."""

    name = "toy-learned"

    def __init__(self, info, target: int = 0, rate: float = 0.1, mode: str = "all-to-one", step: float = 1e-3):
        super().__init__(info, target, rate, mode)
        self.step = step
        self.base: torch.Tensor | None = None
        self.pattern = torch.zeros(info.channels, info.size, info.size)

    def assets(self):
        return {"mean": {"name": "toy-mean-image", "scale": 0.5}}

    def bind_assets(self, assets):
        self.base = assets["mean"]["mean"]

    def apply(self, x):
        assert self.base is not None, "assets not bound"
        return (0.5 * x + self.base.to(x) + self.pattern.to(x)).clamp(0, 1)

    def train_hook(self):
        attack = self

        class _Learn(Hook):
            def after_step(self, state: FitState) -> None:
                w = next(state.model.parameters())
                attack.pattern = attack.pattern + attack.step * torch.sign(w.detach().cpu().flatten()[0])

        return _Learn()

    def state_dict(self):
        return {"pattern": self.pattern.clone()}

    def load_state_dict(self, state):
        self.pattern = state["pattern"].clone()


def register() -> None:
    if "toy-learned" not in ATTACKS:
        ATTACKS.register("toy-learned")(ToyLearned)
        ASSETS.register("toy-mean-image")(toy_mean_image)


def unregister() -> None:
    ATTACKS._entries.pop("toy-learned", None)
    ASSETS._entries.pop("toy-mean-image", None)
