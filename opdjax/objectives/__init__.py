"""opdjax objectives: the mathematics of on-policy distillation as pure functions.

See docs/theory.md for definitions and sign conventions. Per-token functions return
`[...]`; reduce them with `token_mean`, `sequence_mean` or `masked_sum`.
"""

from opdjax.objectives.divergences import DIVERGENCES
from opdjax.objectives.divergences import alpha_divergence
from opdjax.objectives.divergences import forward_kl
from opdjax.objectives.divergences import generalized_jsd
from opdjax.objectives.divergences import get_divergence
from opdjax.objectives.divergences import reverse_kl
from opdjax.objectives.divergences import skew_forward_kl
from opdjax.objectives.divergences import skew_reverse_kl
from opdjax.objectives.divergences import total_variation
from opdjax.objectives.estimators import importance_ratio
from opdjax.objectives.estimators import importance_weighted_pg_loss
from opdjax.objectives.estimators import kl_estimate_k1
from opdjax.objectives.estimators import kl_estimate_k2
from opdjax.objectives.estimators import kl_estimate_k3
from opdjax.objectives.estimators import log_ratio
from opdjax.objectives.estimators import policy_gradient_loss
from opdjax.objectives.estimators import sampled_reverse_kl_loss
from opdjax.objectives.estimators import token_log_probs
from opdjax.objectives.fused import Head
from opdjax.objectives.fused import route_hidden
from opdjax.objectives.fused import token_values
from opdjax.objectives.reductions import masked_sum
from opdjax.objectives.reductions import sequence_mean
from opdjax.objectives.reductions import token_mean
from opdjax.objectives.returns import gopd_rewards
from opdjax.objectives.returns import grpo_advantages
from opdjax.objectives.returns import mix_opd_rl_advantages
from opdjax.objectives.returns import opd_rewards
from opdjax.objectives.returns import reward_to_go
from opdjax.objectives.support import RestrictedLogits
from opdjax.objectives.support import SupportDiagnostics
from opdjax.objectives.support import restrict_to_topk
from opdjax.objectives.support import support_diagnostics
from opdjax.objectives.support import topk_divergence
from opdjax.objectives.targets import tilted_teacher_logits
