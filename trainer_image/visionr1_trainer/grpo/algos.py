"""GRPO math as small pure functions: tensors in, tensors out, no I/O, no globals.

Sources:
- GRPO: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
  Open Language Models", arXiv 2402.03300, eq. (3) (objective), sec. 4.1.2 (group
  normalised advantages), eq. (4) (the k3 KL estimator, after Schulman's "Approximating
  KL Divergence", 2020).
- Vision-R1 (arXiv 2503.06749) trains with this objective, epsilon = 0.2, beta = 1e-2.
- Decoupled clip ranges (epsilon_low / epsilon_high), dynamic sampling and the soft
  overlong penalty: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System
  at Scale", arXiv 2503.14476, eq. (8)-(13).
- Dr. GRPO (no std division, a constant loss divisor): Liu et al., "Understanding
  R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783, sec. 3.2.
- GSPO (a sequence-level importance ratio): Zheng et al., "Group Sequence Policy
  Optimization", arXiv 2507.18071, eq. (5)-(7).
- The group-normalised length penalty: Arora and Zanette, "Training Language Models to
  Reason Efficiently", arXiv 2502.04463, eq. (5).

Variants are chosen by name from registries (``ADVANTAGE_SCALES``, ``LOSS_AGGREGATIONS``,
``IMPORTANCE_LEVELS``, ``OVERLONG_MODES``); an unknown name raises a ``ValueError`` that
lists the valid ones.

Shapes: ``B`` completions in a batch (num_prompts * group_size, each prompt's group
contiguous), ``T`` completion tokens (padded). ``mask`` is 1 on real completion tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

# --- advantages -----------------------------------------------------------------------


def _registry_get(registry: dict, kind: str, name: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}") from None


# How a group's centred rewards are scaled: name -> fn(centred (P, G), std (P, 1), eps) -> (P, G).
ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    # GRPO (DeepSeekMath sec. 4.1.2): divide by the group's standard deviation.
    "std": lambda centred, std, eps: centred / (std + eps),
    # Dr. GRPO (arXiv 2503.20783, sec. 3.2): no division; the std term up-weights groups
    # that are nearly all right or all wrong (a question-difficulty bias).
    "none": lambda centred, std, eps: centred,
}


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "std") -> torch.Tensor:
    """Group-relative advantages: ``(r - mean(group)) / (std(group) + eps)`` for ``scale="std"``
    (GRPO), ``r - mean(group)`` for ``scale="none"`` (Dr. GRPO, arXiv 2503.20783).

    Args:
        rewards: ``(num_prompts * group_size,)``, each prompt's group contiguous.
        group_size: completions per prompt (GRPO's G, the PTST ``numGenerations``).
        eps: added to the standard deviation (keeps the division finite).
        scale: a name in ``ADVANTAGE_SCALES``.

    Returns:
        ``(num_prompts * group_size,)``. The standard deviation is the sample one
        (``torch.std`` default, Bessel-corrected), as in TRL and verl. A group whose
        rewards are all equal carries no learning signal and gets exactly zeros (also
        for ``group_size == 1``, where the sample std is undefined).
    """
    scale_fn = _registry_get(ADVANTAGE_SCALES, "advantage scale", scale)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_prompts * group_size,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(rewards)
    std = grouped.std(dim=1, keepdim=True)
    centred = grouped - mean
    # All-equal groups: centred is exactly 0 there, so the result is 0 without a branch.
    return scale_fn(centred, std, eps).reshape(-1)


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling filter (arXiv 2503.14476, eq. (11)): which groups carry signal.

    A group whose rewards are all equal (all right or all wrong) has zero advantages and
    adds nothing to the policy gradient but the KL term; DAPO drops it and samples more
    prompts until the batch is full.

    Args:
        rewards: ``(num_prompts * group_size,)``, each prompt's group contiguous.
        group_size: completions per prompt.

    Returns: ``(num_prompts,)`` bool, True where a group's rewards are not all equal
    (exact comparison with the group's first reward, so 1-completion groups are never kept).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    return (grouped != grouped[:, :1]).any(dim=1)


# --- reward shaping ---------------------------------------------------------------------


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. (13)), added to the reward.

    With ``L_max = max_length`` and ``L_cache = buffer``: 0 for ``|y| <= L_max - L_cache``,
    ``((L_max - L_cache) - |y|) / L_cache`` inside the buffer (falling linearly from 0 to
    -1), and -1 beyond ``L_max``; times ``factor`` (verl's ``overlong_penalty_factor``).

    Args:
        lengths: ``(B,)`` completion lengths in tokens.
        max_length: the stage's ``maxCompletionLength``.
        buffer: ``L_cache`` in tokens, ``1 <= buffer <= max_length``.

    Returns: ``(B,)`` float32 penalties in ``[-factor, 0]``.
    """
    if not 1 <= buffer <= max_length:
        raise ValueError(f"buffer must be in [1, {max_length}], got {buffer}")
    expected = max_length - buffer
    over = (lengths.float() - expected).clamp(min=0.0)  # tokens into the buffer
    return -factor * (over / buffer).clamp(max=1.0)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """TRL's ``mask_truncated_completions`` (after DAPO sec. 3.4): a completion cut off by
    the length cap (no EOS) is left out of the loss, so the model is not taught that a
    half-finished answer is good or bad.

    Args: ``mask`` ``(B, T)``, ``truncated`` ``(B,)`` bool. Returns ``(B, T)`` like ``mask``.
    """
    return mask * (~truncated.bool()).to(mask.dtype).unsqueeze(1)


def group_length_penalty(lengths: torch.Tensor, correct: torch.Tensor, group_size: int, alpha: float) -> torch.Tensor:
    """Arora and Zanette's length-normalised reward factor (arXiv 2502.04463, eq. (5)).

    For a correct completion ``y`` of a group, the reward ``1`` becomes
    ``1 - alpha * sigmoid((len(y) - mean_correct) / std_correct)``, with the mean and
    standard deviation over the *correct* completions of the same group (the population
    std, as the paper's ``STD``; a group with one correct completion or all correct ones of
    equal length gets ``sigmoid(0) = 0.5``). Incorrect completions get 1 (no change).

    Args:
        lengths: ``(num_prompts * group_size,)`` completion lengths.
        correct: ``(num_prompts * group_size,)`` bool, the answer is right.
        alpha: the penalty strength, ``0 <= alpha < 1`` (0: no penalty).

    Returns: ``(num_prompts * group_size,)`` multiplicative factors in ``(1 - alpha, 1]``.
    """
    if lengths.shape != correct.shape or lengths.dim() != 1 or group_size < 1 or lengths.numel() % group_size:
        raise ValueError(f"lengths {tuple(lengths.shape)} and correct {tuple(correct.shape)} must be 1-D groups of {group_size}")
    length = lengths.float().view(-1, group_size)  # (P, G)
    right = correct.bool().view(-1, group_size).float()
    count = right.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (length * right).sum(dim=1, keepdim=True) / count
    std = (((length - mean) ** 2) * right).sum(dim=1, keepdim=True).div(count).sqrt()
    # A zero std (one correct completion, or equal lengths): the z-score is 0, not 0/0.
    z = torch.where(std > 0, (length - mean) / std.clamp(min=1e-12), torch.zeros_like(length))
    factor = 1.0 - alpha * torch.sigmoid(z)
    return torch.where(right.bool(), factor, torch.ones_like(factor)).view(-1)


# --- data curriculum -------------------------------------------------------------------


def curriculum_slice(keys: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """FastCuRL's length-aware segmentation (Song et al., arXiv 2503.17287, sec. 3.1): the
    rows whose key (e.g. the prompt's length in tokens) ranks in ``[start, end)`` of the set.

    Args:
        keys: ``(N,)`` one sort key per row; ties keep the rows' order (a stable sort).
        start, end: fractions of the rows, ``0 <= start < end <= 1``; the slice is ranks
            ``floor(start * N)`` to ``floor(end * N)`` (``N`` for ``end == 1``), so adjacent
            slices (``[0, 0.5)``, ``[0.5, 1)``) partition the set.

    Returns: ``(n,)`` long, the chosen rows' indexes in ascending (file) order.
    """
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D (N,), got shape {tuple(keys.shape)}")
    if not 0 <= start < end <= 1:
        raise ValueError(f"need 0 <= start < end <= 1, got start={start}, end={end}")
    n = keys.numel()
    order = torch.sort(keys, stable=True).indices
    first, last = int(start * n), n if end >= 1 else int(end * n)
    return order[first:last].sort().values


# --- KL -------------------------------------------------------------------------------


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1``, ``d = ref - logp``.

    Unbiased for the KL under samples from the policy and never negative.
    Args and result: ``(B, T)``.
    """
    log_ratio = ref_logprobs - logprobs
    # Clamp before exp: a far-off reference on one token must not overflow to inf.
    log_ratio = log_ratio.clamp(min=-20.0, max=20.0)
    return torch.exp(log_ratio) - log_ratio - 1.0


# --- masked reductions (loss aggregation registry) --------------------------------------

Aggregation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_AGGREGATIONS: dict[str, Aggregation] = {}


def register_aggregation(name: str) -> Callable[[Aggregation], Aggregation]:
    def wrap(fn: Aggregation) -> Aggregation:
        LOSS_AGGREGATIONS[name] = fn
        return fn
    return wrap


def get_aggregation(name: str) -> Aggregation:
    return _registry_get(LOSS_AGGREGATIONS, "loss aggregation", name)


@register_aggregation("sequence_mean")
def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's masked tokens, then mean over sequences (GRPO paper).

    Divides each row by its own count of real tokens; a fully masked row (no completion
    token at all) contributes 0 and is left out of the mean over sequences. All rows
    masked gives 0.
    """
    mask = mask.to(values.dtype)
    tokens = mask.sum(dim=1)  # (B,)
    per_seq = (values * mask).sum(dim=1) / tokens.clamp(min=1.0)
    has_tokens = (tokens > 0).to(values.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


@register_aggregation("token_mean")
def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over all masked tokens divided by their count (0 when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@register_aggregation("dr_grpo")
def dr_grpo_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783, sec. 3.2): the masked sum divided by a constant,
    ``num_sequences * mask.shape[1]``, so a long completion's tokens weigh what a short
    one's do (the per-sequence mean favours long wrong answers). ``mask.shape[1]`` is the
    padded width: the trainer pads the batch to the stage's ``maxCompletionLength``, as
    TRL divides by ``max_completion_length``. Fully masked rows count in the divisor."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / max(mask.shape[0] * mask.shape[1], 1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (token-level), 0 for an empty mask. For statistics."""
    return token_mean(values, mask)


# --- importance ratios (registry) ----------------------------------------------------------

# name -> fn(log_ratio (B, T), mask (B, T)) -> log importance ratio, (B, T) or (B, 1)
IMPORTANCE_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_importance(name: str):
    def wrap(fn):
        IMPORTANCE_LEVELS[name] = fn
        return fn
    return wrap


@register_importance("token")
def token_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO/PPO: one importance ratio per token, ``(B, T) -> (B, T)``."""
    return log_ratio


@register_importance("sequence")
def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (arXiv 2507.18071, eq. (7)): ``log s_i = mean over i's masked tokens of
    (logprobs - old_logprobs)``, the length-normalised sequence likelihood ratio;
    ``(B, T) -> (B, 1)``, broadcast over the sequence's tokens. Divides by each row's
    count of real tokens; a fully masked row gets 0 (ratio 1, and no token to carry it)."""
    mask = mask.to(log_ratio.dtype)
    return ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).unsqueeze(1)


def get_importance(name: str):
    return _registry_get(IMPORTANCE_LEVELS, "importance sampling level", name)


# --- the loss ---------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.01,
    aggregation: str = "sequence_mean",
    importance: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO clipped surrogate with a k3 KL penalty (DeepSeekMath eq. 3).

    Per token: ``ratio = exp(logprobs - old_logprobs)``,
    ``surrogate = min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)``,
    ``loss = -(surrogate - beta * kl_k3(logprobs, ref_logprobs))``, then aggregated.
    With ``importance="sequence"`` (GSPO, arXiv 2507.18071) the ratio is one per
    sequence, ``exp(mean over its masked tokens of (logprobs - old_logprobs))``, clipped
    per sequence and broadcast over its tokens; the KL term stays per token.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy being trained.
        old_logprobs: ``(B, T)`` the same under the policy that sampled them (detached).
        ref_logprobs: ``(B, T)`` the same under the frozen reference; may be None when beta is 0.
        advantages: ``(B,)`` one advantage per completion, broadcast over its tokens.
        mask: ``(B, T)`` 1 on real completion tokens, 0 on padding.
        aggregation: a name in ``LOSS_AGGREGATIONS`` (sequence_mean, token_mean, dr_grpo).
        importance: a name in ``IMPORTANCE_LEVELS`` (token, sequence).

    Returns:
        ``(loss, stats)``: a scalar loss, and detached scalars ``kl`` (mean k3 over masked
        tokens), ``clip_frac_low``/``clip_frac_high`` (fraction of masked tokens where the
        lower/upper clip bound was the active term), ``clip_frac`` (their sum), ``ratio_mean``.
    """
    aggregate = get_aggregation(aggregation)
    level = get_importance(importance)
    if beta and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # (B, 1) -> broadcast over T
    log_ratio = level(logprobs - old_logprobs, mask)  # (B, T), or (B, 1) per sequence
    log_ratio = log_ratio.clamp(min=-20.0, max=20.0).expand_as(logprobs)  # overflow guard
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    per_token = -surrogate
    kl = kl_k3(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)
    if beta:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask)

    with torch.no_grad():
        # The clipped term is the active (smaller) one exactly when the ratio has left
        # the trust region in the direction the advantage favours.
        low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(mask.dtype)
        stats = {
            "kl": masked_mean(kl, mask),
            "clip_frac_low": masked_mean(low, mask),
            "clip_frac_high": masked_mean(high, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    return loss, stats


# --- token-level helpers -----------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``tokens`` under ``logits``.

    Args:
        logits: ``(B, T, V)`` logits that predict each of ``tokens`` (already shifted).
        tokens: ``(B, T)`` token ids.
        temperature: the sampling temperature; log-probs are those of the distribution
            the tokens were sampled from, as TRL and verl compute them.

    Returns: ``(B, T)``. Computed with ``log_softmax`` in float32: bf16 log-probs are too
    coarse for ratios near 1.
    """
    logits = logits.float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and the entropy of the same (temperature-scaled) distributions.

    One ``log_softmax`` over the vocabulary serves both: at 150K vocabulary entries it
    is the largest tensor of the step. The entropy is a statistic and carries no gradient.
    Shapes: logits ``(B, T, V)``, tokens ``(B, T)`` -> two ``(B, T)``.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)
    return chosen, entropy


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's distribution, ``(B, T, V) -> (B, T)``, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int, pad_token_id: int | None = None) -> torch.Tensor:
    """1 on tokens up to and including the first EOS of each row, 0 after it.

    Args: ``completion_ids`` ``(B, T)``. Returns ``(B, T)`` long. A row with no EOS
    (truncated by the length cap) is all ones. Only the EOS position counts: a padding
    id *sampled* before EOS is a real token the sampler attended to, and masking it
    would make the training forward see a different sequence from the one sampled.
    (``pad_token_id`` is accepted for call-site symmetry and not used.)
    """
    is_eos = completion_ids == eos_token_id
    # Position of the first EOS (or T when none); tokens after it are padding.
    first_eos = torch.where(
        is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], is_eos.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    return (positions <= first_eos.unsqueeze(1)).long()


# --- log-probs from hidden states, chunked over tokens ---------------------------------------------

LOGPROB_CHUNK_TOKENS = 1024  # (1024, 152k) fp32 logits: 0.6 GB per live copy, vs 20 GB for 4 x 8192 tokens


def _chunk_logprobs_and_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n,)`` log-probs of ``tokens`` and ``(n,)`` entropies for ``(n, H)`` hidden states.

    The logits are computed as the model's ``lm_head`` computes them (a linear layer in the
    weights' dtype), then upcast, as ``token_logprobs_and_entropy`` receives them.
    """
    logits = torch.nn.functional.linear(hidden, weight)  # (n, V), the model's dtype
    return token_logprobs_and_entropy(logits.unsqueeze(0), tokens.unsqueeze(0), temperature)


def chunked_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs_and_entropy(hidden @ weight.T, tokens, temperature)``, never holding
    more than ``chunk_tokens`` rows of full-vocabulary logits.

    The unchunked computation materialises ``(B, T, V)`` fp32 logits and their log-softmax
    (at 4 x 8192 tokens and Qwen2.5's 152k vocabulary, about 20 GB each) and autograd keeps
    them for backward. Here the ``B * T`` positions are cut into chunks; each chunk's logits
    live only inside its own forward, and with gradients enabled each chunk is recomputed in
    backward (``torch.utils.checkpoint``, non-reentrant), so backward too holds one chunk's
    logits at a time. The values and gradients equal the unchunked ones (float rounding of
    the same operations; see tests/test_logprob_chunked.py). This is Liger Kernel's and
    verl's "fused linear log-prob" idea in plain torch.

    Args:
        hidden: ``(B, T, H)`` final hidden states, position t predicting ``tokens[:, t]``.
        weight: ``(V, H)`` the output projection (``lm_head.weight``; under ZeRO-3 call this
            inside the module whose parameter it is, where it is gathered).
        tokens: ``(B, T)`` the token ids whose log-probs are wanted.
        temperature: the sampling temperature (log-probs of the distribution sampled from).
        chunk_tokens: positions per chunk (at least 1).

    Returns:
        ``(logprobs, entropy)``, each ``(B, T)`` float32; the entropy carries no gradient.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if hidden.shape[:2] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} differ in (B, T)")
    B, T, H = hidden.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, H), tokens.reshape(B * T)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logprobs, entropy = [], []
    # split, not slicing: its backward concatenates the chunks' gradients once, where each
    # slice's backward would fill a zero (B * T, H) tensor of its own.
    for h, t in zip(flat_hidden.split(chunk_tokens), flat_tokens.split(chunk_tokens)):
        if recompute:  # keep only h for backward; rebuild this chunk's logits there
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_logprobs_and_entropy, h, weight, t, temperature, use_reentrant=False
            )
        else:
            lp, ent = _chunk_logprobs_and_entropy(h, weight, t, temperature)
        logprobs.append(lp.reshape(-1))
        entropy.append(ent.reshape(-1))
    return torch.cat(logprobs).view(B, T), torch.cat(entropy).view(B, T)
