"""SFT: maximum likelihood on the dataset's reference answers (THEORY.md §7)."""

from opdjax.recipes.base import Recipe, nll_loss


def build(config) -> Recipe:
  del config
  return Recipe(name="sft", source="dataset", needs_teacher=False,
                loss=lambda student_logits, teacher_logits, targets: nll_loss(student_logits, targets))
