"""SeqKD: maximum likelihood on the teacher's own samples, as hard labels (docs/theory.md §7)."""

from opdjax.recipes.base import Recipe, nll_loss, nll_token_values


def build(config) -> Recipe:
  del config
  return Recipe(
      name="seqkd", source="teacher", token_values=nll_token_values, loss=nll_loss, loss_value="nll"
  )
