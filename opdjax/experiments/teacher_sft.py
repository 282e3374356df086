"""Trains a teacher by SFT on a synthetic task (arg: addition | modular_chain).

What it shows: the teacher every distillation experiment starts from, trained from scratch
on the task's training split; the held-out greedy accuracy is printed at the end
(0.69 on 2-digit addition, measured).
Time on a 2-core CPU: about 1½ minutes (addition, 1000 steps); about 8 minutes for
modular_chain (1200 steps of 64-token rows).

    python -m opdjax.train --exp teacher_sft                 # addition, 2 digits
    python -m opdjax.train --exp teacher_sft:modular_chain   # the long-horizon task, 12 steps
"""

from opdjax.configs import teacher_config


def get_config(arg=None):
  return teacher_config(arg or "addition")
