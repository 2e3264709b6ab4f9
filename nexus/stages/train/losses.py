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
    log_p_s = F.log_softmax(_scaled(logits, temperature), dim=-1)
    if temperature == 1:
        del logits
        ce = -log_p_s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    else:
        ce = F.cross_entropy(logits.flatten(0, -2), safe.flatten(), reduction="none").view_as(safe)
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
) -> LossParts:
    """Summed next-token cross-entropy and T^2 * KL(teacher || student) over valid positions.

    ``hidden``/``teacher_hidden`` are final hidden states [B, S, H] for ``input_ids``;
    ``labels`` [B, S] are the input ids (shifted here; -100 marks ignored positions).
    """
    h = hidden[:, :-1]
    th = teacher_hidden[:, :-1] if teacher_hidden is not None else None
    y = labels[:, 1:]
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    with_kd = th is not None
    for start in range(0, h.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (h[:, sl], th[:, sl] if with_kd else h[:, sl], y[:, sl])
        if torch.is_grad_enabled() and h.requires_grad:
            ce, kd = checkpoint(_chunk_losses, *args, model, temperature, with_kd, use_reentrant=False)
        else:
            ce, kd = _chunk_losses(*args, model, temperature, with_kd)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    return LossParts(ce_total, kd_total, int((y != -100).sum()))
