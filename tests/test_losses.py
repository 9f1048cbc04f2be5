"""The loss terms fine-tuning uses (training.losses), on hand-made embeddings."""
import torch
import torch.nn.functional as F

from sbir_core.training.losses import cross_modal_triplets, instance_pairs


def _two_classes() -> tuple[torch.Tensor, torch.Tensor]:
    """Three items of class 0 near one axis, one of class 1 on the other (cosine 1 apart)."""
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0]]), dim=-1)
    return x, torch.tensor([0, 0, 0, 1])


def test_triplets_vanish_only_when_every_negative_is_a_margin_further_than_every_positive() -> None:
    x, y = _two_classes()
    assert cross_modal_triplets(x, y, x, y, margin=0.2).item() == 0.0  # every negative ~1 further than every positive
    assert cross_modal_triplets(x, y, x, y, margin=1.5).item() > 0.0
    swapped = cross_modal_triplets(x, y, x, 1 - y, margin=0.2)  # every pair now mislabelled
    assert swapped.item() > 1.0
    lone = cross_modal_triplets(x[:2], y[:2], x[:2], y[:2], margin=0.2)  # no negative: no term, still differentiable
    assert lone.item() == 0.0 and lone.requires_grad is False


def test_instance_pairs_reward_each_photo_finding_its_own_edge_map() -> None:
    g = torch.Generator().manual_seed(0)
    photos = torch.randn(8, 16, generator=g)
    own = instance_pairs(photos, photos + 0.01 * torch.randn(8, 16, generator=g), temperature=0.07)
    shuffled = instance_pairs(photos, photos[torch.roll(torch.arange(8), 1)], temperature=0.07)
    assert own.item() < 0.01 < 5.0 < shuffled.item()
