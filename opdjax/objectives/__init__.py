"""opdjax objectives: the mathematics of on-policy distillation as pure functions.

See docs/theory.md for definitions and sign conventions. Per-token functions return
`[...]`; reduce them with `token_mean`, `sequence_mean` or `masked_sum`.
"""

from opdjax.objectives.divergences import (
    DIVERGENCES,
    alpha_divergence,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from opdjax.objectives.estimators import (
    importance_ratio,
    importance_weighted_pg_loss,
    kl_estimate_k1,
    kl_estimate_k2,
    kl_estimate_k3,
    log_ratio,
    policy_gradient_loss,
    sampled_reverse_kl_loss,
    token_log_probs,
)
from opdjax.objectives.fused import Head, route_hidden, token_values
from opdjax.objectives.reductions import masked_sum, sequence_mean, token_mean
from opdjax.objectives.returns import (
    gopd_rewards,
    grpo_advantages,
    mix_opd_rl_advantages,
    opd_rewards,
    reward_to_go,
)
from opdjax.objectives.support import (
    RestrictedLogits,
    SupportDiagnostics,
    restrict_to_topk,
    support_diagnostics,
    topk_divergence,
)
from opdjax.objectives.targets import tilted_teacher_logits
