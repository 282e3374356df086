"""GKD (Agarwal et al. 2024, arXiv:2306.13649): each step trains on the student's own samples
with probability `lambda_on`, else on dataset answers, with any §1 divergence to the teacher
(JSD(β) in the paper). The coin is drawn on the host from `(seed, step)`, so a resumed run
draws the same coins."""

import functools

import numpy as np

from opdjax.errors import ConfigError
from opdjax.recipes.base import Recipe
from opdjax.recipes.divergence_losses import divergence_loss, divergence_token_values


def on_policy_coin(seed: int, step: int, *, lambda_on: float) -> str:
  """ "student" with probability `lambda_on` (exactly never at 0, always at 1), else "dataset"."""
  return "student" if np.random.default_rng([seed, step]).random() < lambda_on else "dataset"


def build(config) -> Recipe:
  lambda_on = float(config.lambda_on)
  if not 0.0 <= lambda_on <= 1.0:
    raise ConfigError(f"recipe.lambda_on must be in [0, 1], got {lambda_on}")
  return Recipe(
      name="gkd",
      source=functools.partial(on_policy_coin, lambda_on=lambda_on),
      roles=("teacher",),
      token_values=divergence_token_values(config),
      loss=divergence_loss,
      loss_value="divergence",
  )
