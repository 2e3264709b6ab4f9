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
    """Logits from final hidden states the way the model's own head computes them."""
    logits = model.get_output_embeddings()(hidden)
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


def offline_kl(log_p_s: torch.Tensor, ids: torch.Tensor, logp_t: torch.Tensor, rest_t: torch.Tensor):
    """KL(teacher || student) per position from the teacher's top-k (``nexus distill``).

    Exact on the k stored ids; the rest of the vocabulary is one bucket on each side: the
    teacher's stored remaining mass ``exp(rest_t)`` against the student's mass outside those
    ids (its log-sum-exp, so no ``log(1 - sum)`` cancellation). With k = vocabulary size the
    bucket is empty and this is the full KL of online KD.
    """
    p_t = logp_t.exp()
    kl = (p_t * (logp_t - log_p_s.gather(-1, ids))).sum(-1)
    if ids.shape[-1] < log_p_s.shape[-1]:
        log_s_rest = log_p_s.scatter(-1, ids, float("-inf")).logsumexp(-1)
        p_rest = rest_t.exp()
        kl = kl + torch.where(p_rest > 0, p_rest * (rest_t - log_s_rest), torch.zeros_like(p_rest))
    return kl


def _chunk_losses_offline(student_h, labels, ids, logp_t, rest_t, model, temperature: float):
    mask = labels != -100
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
