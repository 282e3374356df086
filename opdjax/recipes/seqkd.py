"""SeqKD: maximum likelihood on the teacher's own samples, as hard labels (§7)."""

from opdjax.recipes.base import Recipe, nll_loss


def build(config) -> Recipe:
  del config
  return Recipe(name="seqkd", source="teacher", needs_teacher=False,
                loss=lambda student_logits, teacher_logits, targets: nll_loss(student_logits, targets))
