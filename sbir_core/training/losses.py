"""The training losses of `finetune`, beside its plain cross-entropies: ZSCMR's cross-modal
triplets, the photo <-> own edge map instance term, soft text targets (semantic label
smoothing) and two ways of keeping what the ImageNet backbone knew (SAKE): its
photo-to-photo relations, or its class predictions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sbir_core.models.encoders import EfficientNetLiteBackbone


def cross_modal_triplets(a: torch.Tensor, ya: torch.Tensor, b: torch.Tensor, yb: torch.Tensor,
                         margin: float) -> torch.Tensor:
    """ZSCMR cross-modal triplets, batch-hard, anchored in both modalities (inputs normalised)."""
    sim = a @ b.T
    same = ya[:, None] == yb[None, :]
    out = []
    for s, msk in ((sim, same), (sim.T, same.T)):
        has = msk.any(1) & (~msk).any(1)
        if has.any():
            pos = torch.where(msk, s, torch.full_like(s, 2.0)).min(1).values
            neg = torch.where(~msk, s, torch.full_like(s, -2.0)).max(1).values
            out.append(F.relu(margin - pos + neg)[has].mean())
    return torch.stack(out).mean() if out else a.sum() * 0


def instance_pairs(photos: torch.Tensor, edges: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: each photo must pick its own edge map among the batch's, and back."""
    a, b = F.normalize(photos, dim=-1), F.normalize(edges, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def semantic_targets(text: torch.Tensor, smoothing: float, temperature: float) -> Optional[torch.Tensor]:
    """(C, C) soft text-alignment targets: row c is (1 - smoothing) on class c plus `smoothing`
    spread over the other classes by the softmax of their names' cosine to c's name. Unseen
    classes are reached only through names, so a space that keeps names' neighbourhoods
    should carry further than one trained to separate every training class equally.
    None for smoothing 0 (one-hot targets)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"semantic smoothing is in [0, 1), not {smoothing}")
    if smoothing == 0.0:
        return None
    t = F.normalize(text.float(), dim=-1)
    sim = (t @ t.T) / temperature
    eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
    near = sim.masked_fill(eye, float("-inf")).softmax(-1)
    return (1.0 - smoothing) * eye.float() + smoothing * near


def relations_kept(teacher: EfficientNetLiteBackbone, photos: torch.Tensor, emb: torch.Tensor,
                   mean: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """KL from the teacher's photo-to-photo similarity distribution (batch-centred ImageNet
    features) to the student's (retrieval embeddings), each photo against the others."""
    with torch.no_grad():
        t = teacher.features((photos - mean) / 0.5).pooled
        t = F.normalize(t - t.mean(0), dim=-1)
    s = F.normalize(emb, dim=-1)
    off = ~torch.eye(len(s), dtype=torch.bool)
    tl = (t @ t.T / tau)[off].view(len(s), -1)
    sl = (s @ s.T / tau)[off].view(len(s), -1)
    return F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl, -1), log_target=True, reduction="batchmean")


def imagenet_kept(teacher: EfficientNetLiteBackbone, images: torch.Tensor, logits: torch.Tensor,
                  mean: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """SAKE's knowledge preservation: cross-entropy of the student's ImageNet predictions
    (`logits`, through its own trainable classifier) against the frozen ImageNet model's
    on the same `images` in [0, 1], both softened by `temperature` (times its square, so the
    gradient's size does not depend on it)."""
    with torch.no_grad():
        t = teacher.net.classifier(teacher.features((images - mean) / 0.5).raw)
    target = F.softmax(t.float() / temperature, -1)
    return -(target * F.log_softmax(logits.float() / temperature, -1)).sum(-1).mean() * temperature ** 2
