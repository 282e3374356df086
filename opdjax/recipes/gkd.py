"""GKD (Agarwal et al. 2024, arXiv:2306.13649): student samples with probability
`lambda_on`, else dataset answers; any §1 divergence (JSD(β) by default in the experiments)."""

from opdjax.recipes.base import Recipe
from opdjax.recipes.divergence_losses import divergence_loss, divergence_token_values


def build(config) -> Recipe:
  lambda_on = float(config.lambda_on)
  if not 0.0 <= lambda_on <= 1.0:
    raise ValueError(f"recipe.lambda_on must be in [0, 1], got {lambda_on}")
  return Recipe(name="gkd", source="mixed", needs_teacher=True,
                token_values=divergence_token_values(config), loss=divergence_loss,
                lambda_on=lambda_on)
