"""Supervised KD: a divergence to the teacher on fixed dataset answers (soft labels, §7)."""

from opdjax.recipes.base import Recipe
from opdjax.recipes.divergence_losses import divergence_loss, divergence_token_values


def build(config) -> Recipe:
  return Recipe(
      name="supervised_kd",
      source="dataset",
      roles=("teacher",),
      token_values=divergence_token_values(config),
      loss=divergence_loss,
      loss_value="divergence",
  )
