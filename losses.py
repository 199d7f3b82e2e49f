"""What kvnest measures and trains on: the distance of a compressed model's predictions to the full model's.

    KL(p_full || p_method) = sum_v p_full(v) (log p_full(v) - log p_method(v))   per position
    top-1 agreement        = [argmax p_full = argmax p_method]
    distillation loss      = kl_weight * mean_t KL + ce_weight * mean_t CE(x_{t+1}, p_method)

train.py minimises the loss, search.py ranks candidates by the KL, eval.py reports both.
"""
import torch
import torch.nn.functional as F


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(ref || method) summed over the vocabulary, and top-1 agreement. (..., V) -> (...), (...)"""
    ref_logp, logp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)  # KL >= 0; rounding can dip below
    return kl, (ref_logits.argmax(-1) == logits.argmax(-1)).float()


def distill_loss(teacher: torch.Tensor, student: torch.Tensor, targets: torch.Tensor, kl_w: float, ce_w: float):
    """kl_w * KL(teacher || student) + ce_w * CE, each averaged over positions. logits (B, T, V), targets (B, T)."""
    loss = student.new_zeros((), dtype=torch.float32)
    if kl_w:
        loss = loss + kl_w * kl_and_top1(teacher, student)[0].mean()
    if ce_w:
        loss = loss + ce_w * F.cross_entropy(student.flatten(0, 1).float(), targets.flatten())
    return loss
