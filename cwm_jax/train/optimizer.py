"""AdamW with warmup then cosine / linear / constant decay, global-norm clipping and no weight decay on norms."""

from __future__ import annotations

import jax
import optax


def learning_rate(opt_cfg, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `decay` down to `lr * min_lr_ratio` at `steps`."""
    lr, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
    floor = lr * float(opt_cfg.min_lr_ratio)
    rest = max(steps - warmup, 1)
    if opt_cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=floor / lr if lr else 0.0)
    elif opt_cfg.decay == "linear":
        after = optax.linear_schedule(lr, floor, rest)
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params):
    """True for the weights that get weight decay: every matrix, not the RMSNorm scales (`*norm`)."""

    def decays(path, _):
        return not str(getattr(path[-1], "key", path[-1])).endswith("norm")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, steps: int) -> optax.GradientTransformation:
    """The run's optimizer: clip the global norm to `clip_norm` (0 = off), then AdamW."""
    adamw = optax.adamw(
        learning_rate(opt_cfg, steps),
        b1=float(opt_cfg.b1),
        b2=float(opt_cfg.b2),
        eps=float(opt_cfg.eps),
        weight_decay=float(opt_cfg.weight_decay),
        mask=decay_mask,
    )
    if opt_cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(float(opt_cfg.clip_norm)), adamw)
    return adamw
