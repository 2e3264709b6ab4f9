"""Language-model losses computed in sequence chunks.

The vocabulary projection is the largest activation in training (GPT-OSS: 201k x seq x 4
bytes per sequence). We never materialise it for the whole sequence: the final hidden
states are cut into chunks along the sequence, and each chunk's logits, cross-entropy and
KL(teacher || student) are computed inside ``torch.utils.checkpoint`` so that backward
recomputes them chunk by chunk. Peak memory is one chunk of logits, not the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LossParts:
    """Summed (not averaged) losses over ``tokens`` predicted positions."""

    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    tokens: int


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states the way the model's own head computes them.

    The head sees a 2-D input: a chunk ``hidden[:, a:b]`` is a strided 3-D view, and for such
    an input ``F.linear`` falls back to a batched matmul that expands the head's weight over
    the batch, one weight-sized copy per sequence (GPT-OSS: 1.2 GB each in bf16) in forward
    and again in backward. Flattening copies only the chunk's hidden states.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = model.get_output_embeddings()(flat).view(*hidden.shape[:-1], -1)
    scaling = getattr(model.config, "logits_scaling", None)  # GraniteMoE divides its logits
    if scaling:
        logits = logits / scaling
    return logits.float()


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1 else logits / temperature


def _student_logp_ce(logits: torch.Tensor, safe: torch.Tensor, temperature: float):
    """The student's (tempered) log-probabilities and the per-position CE; frees ``logits`` at T = 1."""
    log_p_s = F.log_softmax(_scaled(logits, temperature), dim=-1)
    if temperature == 1:
        ce = -log_p_s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    else:
        ce = F.cross_entropy(logits.flatten(0, -2), safe.flatten(), reduction="none").view_as(safe)
    return log_p_s, ce


def _chunk_losses(student_h, teacher_h, labels, model, temperature: float, with_kd: bool):
    logits = lm_logits(model, student_h)
    mask = labels != -100
    safe = labels.clamp_min(0)
    if not with_kd:
        ce = F.cross_entropy(logits.flatten(0, -2), safe.flatten(), reduction="none")
        return (ce * mask.flatten()).sum(), torch.zeros((), device=logits.device)
    # Memory: KD keeps only two vocabulary-sized tensors for backward, the student's
    # log-probabilities (shared with CE when T == 1) and the teacher's probabilities; sums
    # over the vocabulary are batched dot products, so no vocabulary-sized product is made.
    # KL(t || s) = sum p_t (log p_t - log p_s): its value is computed without gradient
    # (elementwise difference first, so small KLs keep their precision) and its gradient
    # comes from -sum p_t log p_s, the only term that depends on the student.
    log_p_s, ce = _student_logp_ce(logits, safe, temperature)
    del logits
    with torch.no_grad():
        log_p_t = F.log_softmax(_scaled(lm_logits(model, teacher_h), temperature), dim=-1)
        p_t = log_p_t.exp()
        kl_value = _rowdot(p_t, log_p_t.sub_(log_p_s.detach()))  # in place: log p_t - log p_s
        del log_p_t
    cross = _rowdot(p_t, log_p_s)
    kl = kl_value - (cross - cross.detach())
    kd_sum = (kl * mask).sum() * temperature**2
    return (ce * mask).sum(), kd_sum


def _probs_outside(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``exp(log_p)`` with the entries at ``ids`` zeroed (a fresh tensor)."""
    return log_p.exp().scatter_(-1, ids, 0.0)


class _LogMassOutside(torch.autograd.Function):
    """``log sum_{j not in ids} exp(log_p[j])`` over the last dimension, lean on time and memory.

    The student's mass outside the teacher's top-k, summed directly over the other entries (no
    ``log(1 - sum of the top-k)``, which cancels catastrophically when the top-k hold nearly
    all the mass). Why a Function: the obvious ``log_p.scatter(-1, ids, -inf).logsumexp(-1)``
    keeps a vocabulary-sized copy for backward and makes about twice as many vocabulary-sized
    passes; this one keeps nothing but ``log_p`` (which log-softmax's backward keeps anyway)
    and recomputes the probabilities in backward. Used at temperatures other than 1; at 1,
    :class:`_OfflineLosses` computes the whole offline loss.
    """

    @staticmethod
    def forward(ctx, log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        mass = _probs_outside(log_p, ids).sum(-1)
        ctx.save_for_backward(log_p, ids, mass)
        return mass.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_p, ids, mass = ctx.saved_tensors
        # d log(mass) / d log_p[j] = p[j] / mass outside ids, 0 on them (0 where mass is 0)
        factor = torch.where(mass > 0, grad / mass, torch.zeros_like(mass))
        return _probs_outside(log_p, ids).mul_(factor.unsqueeze(-1)), None


def offline_kl(log_p_s: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor, rest_t: torch.Tensor):
    """KL(teacher || student) per position from the teacher's top-k (``nexus distill``).

    Exact on the k stored ids; the rest of the vocabulary is one bucket on each side: the
    teacher's stored remaining mass ``exp(rest_t)`` against the student's mass outside those
    ids (summed over them, :class:`_LogMassOutside`). With k = vocabulary size the bucket is
    empty and this is the full KL of online KD.
    """
    p_t = logp_t.exp()
    kl = (p_t * (logp_t - log_p_s.gather(-1, ids))).sum(-1)
    if ids.shape[-1] < log_p_s.shape[-1]:
        log_s_rest = _LogMassOutside.apply(log_p_s, ids)
        p_rest = rest_t.exp()
        kl = kl + torch.where(p_rest > 0, p_rest * (rest_t - log_s_rest), torch.zeros_like(p_rest))
    return kl


class _OfflineLosses(torch.autograd.Function):
    """Summed CE and top-k KL (:func:`offline_kl`) at temperature 1 from logits, in one pass.

    Value: exactly :func:`offline_kl` plus the cross-entropy. Gradient with respect to the
    logits, written out: with ``s = softmax(z)``, ``P`` the teacher's stored top-k mass and
    ``w = exp(rest_t) / (student mass outside the top-k)``,
    ``dCE = s - onehot(y)`` and ``dKL = s (P + exp(rest_t)) - p_t on the top-k - w s outside it``.
    Why: autograd through log-softmax, two gathers and the outside-mass sum makes about twice as
    many vocabulary-sized passes (and allocations) as this, and offline KD is only worth having
    if a step costs what a step without KD costs (``benchmarks/train.py``).
    """

    @staticmethod
    def forward(ctx, logits, labels, mask, ids, logp_t, rest_t):
        log_p = torch.log_softmax(logits, dim=-1)
        maskf = mask.to(log_p.dtype)
        ce = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        p_t = logp_t.exp()
        kl = (p_t * (logp_t - log_p.gather(-1, ids))).sum(-1)
        outside = ids.shape[-1] < log_p.shape[-1]
        if outside:
            mass = _probs_outside(log_p, ids).sum(-1)
            p_rest = rest_t.exp()
            kl = kl + torch.where(p_rest > 0, p_rest * (rest_t - mass.log()), torch.zeros_like(p_rest))
            w = torch.where((p_rest > 0) & (mass > 0), p_rest / mass, torch.zeros_like(mass))
            top = p_t.sum(-1) + p_rest
        else:
            w, top = None, p_t.sum(-1)
        ctx.save_for_backward(log_p, labels, maskf, ids, p_t, top, w)
        return (ce * maskf).sum(), (kl * maskf).sum()

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        log_p, labels, maskf, ids, p_t, top, w = ctx.saved_tensors
        a, b = maskf * g_ce, maskf * g_kd  # per-position weights of the two sums
        grad = log_p.exp()  # softmax, becomes the gradient in place
        row = a + b * top
        if w is not None:
            row = row - b * w
        s_top = grad.gather(-1, ids)
        grad.mul_(row.unsqueeze(-1))
        on_top = -b.unsqueeze(-1) * p_t
        if w is not None:  # the "outside" term does not apply on the top-k: add it back there
            on_top = on_top + (b * w).unsqueeze(-1) * s_top
        grad.scatter_add_(-1, ids, on_top)
        grad.scatter_add_(-1, labels.unsqueeze(-1), -a.unsqueeze(-1))
        return grad, None, None, None, None, None


def _chunk_losses_offline(student_h, labels, ids, logp_t, rest_t, model, temperature: float):
    mask = labels != -100
    if temperature == 1:
        return _OfflineLosses.apply(
            lm_logits(model, student_h), labels.clamp_min(0), mask, ids, logp_t, rest_t
        )
    log_p_s, ce = _student_logp_ce(lm_logits(model, student_h), labels.clamp_min(0), temperature)
    kd_sum = (offline_kl(log_p_s, ids, logp_t, rest_t) * mask).sum() * temperature**2
    return (ce * mask).sum(), kd_sum


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` as a batched matrix product (no temporary of ``a``'s size)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).reshape(a.shape[:-1])


def chunked_lm_losses(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    teacher_rows=None,
) -> LossParts:
    """Summed next-token cross-entropy and T^2 * KL(teacher || student) over valid positions.

    ``hidden``/``teacher_hidden`` are final hidden states [B, S, H] for ``input_ids``;
    ``labels`` [B, S] are the input ids (shifted here; -100 marks ignored positions).
    ``teacher_rows`` (:class:`~nexus.stages.train.data.TeacherRows`, offline KD) replaces
    ``teacher_hidden``: the teacher's stored top-k for positions 0..S-2.
    """
    h = hidden[:, :-1]
    th = teacher_hidden[:, :-1] if teacher_hidden is not None else None
    y = labels[:, 1:]
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    with_kd = th is not None
    for start in range(0, h.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        if teacher_rows is not None:
            fn = _chunk_losses_offline
            t = teacher_rows
            args = (h[:, sl], y[:, sl], t.ids[:, sl], t.logp[:, sl], t.rest[:, sl], model, temperature)
        else:
            fn = _chunk_losses
            args = (h[:, sl], th[:, sl] if with_kd else h[:, sl], y[:, sl], model, temperature, with_kd)
        if torch.is_grad_enabled() and h.requires_grad:
            ce, kd = checkpoint(fn, *args, use_reentrant=False)
        else:
            ce, kd = fn(*args)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    return LossParts(ce_total, kd_total, int((y != -100).sum()))
