"""Algorithms as small modules: each `build(recipe_config) -> Recipe` (source, roles, loss)."""

from opdjax.errors import ConfigError
from opdjax.recipes import gkd, gopd, grpo, opd, self_distill, seqkd, sft, supervised_kd
from opdjax.recipes.base import Recipe, Sequences, Targets, inputs_of, join, targets_of

RECIPES = {
    "sft": sft,
    "seqkd": seqkd,
    "supervised_kd": supervised_kd,
    "gkd": gkd,
    "opd": opd,
    "gopd": gopd,
    "grpo": grpo,
    "self_distill": self_distill,
}


def build(config) -> Recipe:
  """The recipe named by `config.name`, built from the rest of `config`."""
  if config.name not in RECIPES:
    raise ConfigError(f"unknown recipe {config.name!r}; valid: {sorted(RECIPES)}")
  return RECIPES[config.name].build(config)
