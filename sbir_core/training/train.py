"""`train`: fit the heads on cached frozen-backbone features (MA-SBIR and ZSCMR losses).

Recipes are JSON files in `sbir_core/recipes/` (like open_clip's model configs);
any field can be overridden from the command line. Every loss term is switchable
by its weight (0 = off).

Honest protocol: classes of the excluded benchmark splits never reach training
(photos, sketches, or class-name text; enforced in `data.py`), and model selection
uses held-out *training* classes only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from sbir_core.models.checkpoint import save_checkpoint
from sbir_core.data.datasets import assert_texts_allowed, fingerprint, training_items
from sbir_core.models.encoders import SBIREncoder, create_encoder
from sbir_core.eval.features import extract_features
from sbir_core.models.heads import SBIRHead
from sbir_core.gallery.index import Gallery
from sbir_core.eval.metrics import map_all
from sbir_core.models.text import class_text_features
from sbir_core.training.losses import cross_modal_triplets, instance_pairs, supcon

log = logging.getLogger(__name__)

from sbir_core.paths import RECIPES_DIR  # noqa: E402
LOSSES = (
    "text",        # MA-SBIR: contrastive alignment of every image with its class text
    "center",      # MA-SBIR: semantic centre, modality-free image part <-> class text part
    "recon",       # MA-SBIR: s_image + m_text -> text embedding, and back
    "disc",        # MA-SBIR (optional): modality discriminator on s, gradient-reversed
    "latent",      # ZSCMR: photo and sketch latents pulled to their class's semantic vector
    "triplet",     # ZSCMR: cross-modal triplets, sketch- and photo-anchored
    "decoder",     # ZSCMR: photo->sketch and sketch->photo decoders, reconstruction loss
    "cls",         # ZSCMR: classification over training classes
    "pair",        # photo <-> its own edge map (pseudo-sketch), instance contrastive
    "xclass",      # class-level sketch <-> photo contrastive on shared classes
)


@dataclass
class TrainConfig:
    encoder: str = "efficientnet-lite0"
    embed_dim: int = 256
    hidden: int = 1024
    dropout: float = 0.2
    steps: int = 1000
    batch: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-4
    temperature: float = 0.07
    margin: float = 0.2
    seed: int = 0
    val_fraction: float = 0.15
    max_photos_per_class: int = 80
    eval_every: int = 50
    patience: int = 6
    aug_seeds: tuple = (1, 2)
    use_edges: bool = True            # photo edge maps as pseudo-sketches of every photo class
    photo_edge_weight: float = 0.0    # fuse a photo's edge-map embedding at retrieval time
    diffusion: bool = True            # pick gallery diffusion (DBA + aQE) neighbours on held-out classes
    exclude: tuple = ("pacs", "doodle")
    losses: dict = field(default_factory=lambda: {k: 0.0 for k in LOSSES})

    @classmethod
    def from_recipe(cls, name_or_path: str) -> "TrainConfig":
        path = Path(name_or_path)
        if not path.is_file():
            path = RECIPES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
            raise FileNotFoundError(f"no recipe {name_or_path!r}; known: {', '.join(known)}")
        cfg = json.loads(path.read_text())
        losses = {k: 0.0 for k in LOSSES}
        unknown = set(cfg.get("losses", {})) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {', '.join(LOSSES)}")
        losses.update(cfg.pop("losses", {}))
        for k in ("aug_seeds", "exclude"):
            if k in cfg:
                cfg[k] = tuple(cfg[k])
        cfg.pop("about", None)
        return cls(**cfg, losses=losses)


# ----------------------------------------------------------------------------- data on features
@dataclass
class FeatureSet:
    """Cached backbone features of the training items, grouped by view."""

    photo: np.ndarray                 # (Np, P)
    photo_edges: list[np.ndarray]     # views of each photo as a pseudo-sketch: [(Np, P), ...]
    sketch: list[np.ndarray]          # views of each sketch: [(Ns, P), ...]
    photo_labels: np.ndarray          # (Np,) class index
    sketch_labels: np.ndarray         # (Ns,)
    classes: list[str]


def load_training_features(encoder: SBIREncoder, data_root: Path, cfg: TrainConfig) -> tuple[FeatureSet, list]:
    items = training_items(data_root, exclude=cfg.exclude, max_photos_per_class=cfg.max_photos_per_class)
    P = [i for i in items if i.modality == "photo"]
    S = [i for i in items if i.modality == "sketch"]
    fp = extract_features(encoder, P, "photo", desc="photos")
    fs = extract_features(encoder, S, "sketch", desc="sketches")
    sk_views = [fs["pooled"]]
    ed_views = []
    if cfg.use_edges:
        ed_views.append(extract_features(encoder, P, "edges", desc="photo edges")["pooled"])
    for seed in cfg.aug_seeds:
        sk_views.append(extract_features(encoder, S, "sketch_aug", seed=seed, desc=f"sketch aug {seed}")["pooled"])
        if cfg.use_edges:
            ed_views.append(extract_features(encoder, P, "edges_aug", seed=seed, desc=f"edge aug {seed}")["pooled"])
    classes = sorted({i.label for i in items})
    assert_texts_allowed(classes, data_root, cfg.exclude)
    cidx = {c: k for k, c in enumerate(classes)}
    keep_p = fp["ok"]
    keep_s = fs["ok"]
    fset = FeatureSet(
        photo=fp["pooled"][keep_p],
        photo_edges=[v[keep_p] for v in ed_views],
        sketch=[v[keep_s] for v in sk_views],
        photo_labels=np.array([cidx[i.label] for i in P])[keep_p],
        sketch_labels=np.array([cidx[i.label] for i in S])[keep_s],
        classes=classes,
    )
    return fset, items


def split_classes(fs: FeatureSet, fraction: float, seed: int) -> np.ndarray:
    """Held-out training classes for model selection: a share of the classes that have
    both photos and sketches (so sketch->photo retrieval can be measured), plus the same
    share of one-sided classes. Returns a boolean mask over classes (True = held out)."""
    rng = np.random.default_rng(seed)
    n = len(fs.classes)
    has_p = np.bincount(fs.photo_labels, minlength=n) > 0
    has_s = np.bincount(fs.sketch_labels, minlength=n) > 0
    held = np.zeros(n, bool)
    for group in (has_p & has_s, has_p & ~has_s, ~has_p & has_s):
        idx = np.flatnonzero(group)
        k = max(1, int(round(len(idx) * fraction))) if len(idx) else 0
        held[rng.choice(idx, size=k, replace=False)] = True
    return held


# ----------------------------------------------------------------------------- losses
class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class Trainer:
    def __init__(self, cfg: TrainConfig, fs: FeatureSet, text_feats: torch.Tensor, held: np.ndarray) -> None:
        self.cfg = cfg
        self.fs = fs
        self.held = held
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        in_dim = fs.photo.shape[1]
        self.head = SBIRHead(in_dim, text_feats.shape[1], cfg.embed_dim, cfg.hidden, cfg.dropout,
                             text_source="minilm", photo_edge_weight=cfg.photo_edge_weight)
        train_p = ~held[fs.photo_labels]
        train_s = ~held[fs.sketch_labels]
        self.p_idx = np.flatnonzero(train_p)
        self.s_idx = np.flatnonzero(train_s)
        # Per-modality standardisation from training data only. The sketch side pools
        # real sketches and edge maps: both are what the sketch modality sees.
        sk_all = np.concatenate([fs.sketch[0][self.s_idx]] + [v[self.p_idx] for v in fs.photo_edges[:1]])
        for i, arr in enumerate((fs.photo[self.p_idx], sk_all)):
            a = torch.from_numpy(arr.astype(np.float32))
            self.head.feat_mean[i] = a.mean(0)
            self.head.feat_std[i] = a.std(0) + 1e-3
        self.text = text_feats.float()
        self.train_classes = torch.from_numpy(np.flatnonzero(~held))
        n_cls = len(fs.classes)
        self.classifier = nn.Linear(cfg.embed_dim, n_cls)
        self.disc = nn.Sequential(nn.Linear(cfg.embed_dim, 128), nn.ReLU(), nn.Linear(128, 2))
        params = list(self.head.parameters()) + list(self.classifier.parameters()) + list(self.disc.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
        # Shared classes (both modalities present among training classes) for cross-modal pairs.
        has_p = np.bincount(fs.photo_labels[self.p_idx], minlength=n_cls) > 0
        has_s = np.bincount(fs.sketch_labels[self.s_idx], minlength=n_cls) > 0
        self.shared = torch.from_numpy(has_p & has_s)

    def _batch(self):
        cfg, fs, rng = self.cfg, self.fs, self.rng
        bp = rng.choice(self.p_idx, cfg.batch // 2, replace=False)
        bs = rng.choice(self.s_idx, cfg.batch // 2, replace=False)
        photo = torch.from_numpy(fs.photo[bp].astype(np.float32))
        sv = rng.integers(0, len(fs.sketch), len(bs))
        sketch = torch.from_numpy(np.stack([fs.sketch[v][i] for v, i in zip(sv, bs)]).astype(np.float32))
        edges = None
        if fs.photo_edges:
            ev = rng.integers(0, len(fs.photo_edges), len(bp))
            edges = torch.from_numpy(np.stack([fs.photo_edges[v][i] for v, i in zip(ev, bp)]).astype(np.float32))
        return (photo, torch.from_numpy(fs.photo_labels[bp])), (sketch, torch.from_numpy(fs.sketch_labels[bs])), edges

    def step(self) -> dict[str, float]:
        cfg, h, w = self.cfg, self.head, self.cfg.losses
        h.train()
        (xp, yp), (xs, ys), xe = self._batch()
        sp = h.semantic(xp, "photo")
        ss = h.semantic(xs, "sketch")
        sk_all, yk_all = ss, ys
        se = None
        if xe is not None:
            se = h.semantic(xe, "sketch")
            sk_all, yk_all = torch.cat([ss, se]), torch.cat([ys, yp])
        img = torch.cat([sp, sk_all])
        yimg = torch.cat([yp, yk_all])
        st_all = h.embed_text(self.text)  # (C, D) text semantic parts for every class
        tc = self.train_classes
        remap = torch.full((len(self.fs.classes),), -1, dtype=torch.long)
        remap[tc] = torch.arange(len(tc))
        losses: dict[str, torch.Tensor] = {}
        if w["text"]:
            logits = F.normalize(img, dim=-1) @ F.normalize(st_all[tc], dim=-1).T / cfg.temperature
            losses["text"] = F.cross_entropy(logits, remap[yimg])
        if w["center"]:
            losses["center"] = (F.normalize(img, dim=-1) - F.normalize(st_all[yimg], dim=-1)).pow(2).sum(-1).mean()
        if w["recon"]:
            m = h.modality
            z_text = st_all[yimg] + m[2]
            mods = torch.cat([torch.zeros(len(sp), dtype=torch.long), torch.ones(len(sk_all), dtype=torch.long)])
            z_img = img + m[mods]
            losses["recon"] = F.mse_loss(img + m[2], z_text) + F.mse_loss(st_all[yimg] + m[mods], z_img)
        if w["disc"]:
            mods = torch.cat([torch.zeros(len(sp), dtype=torch.long), torch.ones(len(sk_all), dtype=torch.long)])
            losses["disc"] = F.cross_entropy(self.disc(GradReverse.apply(img)), mods)
        if w["latent"]:
            target = F.normalize(st_all.detach()[yimg], dim=-1)
            losses["latent"] = F.mse_loss(F.normalize(img, dim=-1), target) * img.shape[1]
        if w["triplet"]:
            losses["triplet"] = cross_modal_triplets(F.normalize(sk_all, dim=-1), yk_all, F.normalize(sp, dim=-1), yp,
                                                     self.cfg.margin)
        if w["decoder"]:
            if se is not None:  # instance pairs: a photo and its own edge map
                l1 = F.mse_loss(h.decode(sp, "photo"), se.detach()) + F.mse_loss(h.decode(se, "sketch"), sp.detach())
            else:
                l1 = sp.sum() * 0
            losses["decoder"] = l1
        if w["cls"]:
            losses["cls"] = F.cross_entropy(self.classifier(img)[:, tc], remap[yimg])
        if w["pair"] and se is not None:
            losses["pair"] = instance_pairs(sp, se, cfg.temperature)
        if w["xclass"]:
            keep_s = self.shared[ys]
            keep_p = self.shared[yp]
            if keep_s.any() and keep_p.any():
                losses["xclass"] = 0.5 * (supcon(ss[keep_s], sp[keep_p], ys[keep_s], yp[keep_p], cfg.temperature)
                                          + supcon(sp[keep_p], ss[keep_s], yp[keep_p], ys[keep_s], cfg.temperature))
        total = sum(w[k] * v for k, v in losses.items())
        self.opt.zero_grad()
        total.backward()
        self.opt.step()
        self.sched.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def validate(self, diffusion_k: int = 0) -> float:
        """sketch->photo mAP@all on held-out training classes (queries: real sketches of
        held-out classes that have photos; gallery: all held-out photos)."""
        h, fs = self.head.eval(), self.fs
        gp = np.flatnonzero(self.held[fs.photo_labels])
        has_p = np.isin(fs.sketch_labels, fs.photo_labels[gp])
        qs = np.flatnonzero(self.held[fs.sketch_labels] & has_p)
        if len(qs) == 0 or len(gp) == 0:
            return float("nan")
        q = F.normalize(h.semantic(torch.from_numpy(fs.sketch[0][qs].astype(np.float32)), "sketch"), dim=-1)
        g = F.normalize(self._embed_photos(gp), dim=-1)
        gallery = Gallery.from_embeddings(g.numpy(), diffusion_k=diffusion_k)
        return map_all(gallery.score_all(q.numpy()), fs.sketch_labels[qs], fs.photo_labels[gp])

    def choose_diffusion(self, candidates: tuple = (0, 5, 10, 20)) -> tuple[int, dict]:
        """Gallery diffusion neighbours, picked on held-out training classes."""
        scores = {k: self.validate(k) for k in candidates}
        return max(scores, key=lambda k: (scores[k], -k)), scores

    def _embed_photos(self, idx) -> torch.Tensor:
        h, fs = self.head, self.fs
        g = h.semantic(torch.from_numpy(fs.photo[idx].astype(np.float32)), "photo")
        if self.cfg.photo_edge_weight and fs.photo_edges:
            e = h.semantic(torch.from_numpy(fs.photo_edges[0][idx].astype(np.float32)), "sketch")
            wgt = self.cfg.photo_edge_weight
            g = F.normalize(g, dim=-1) * (1 - wgt) + F.normalize(e, dim=-1) * wgt
        return g

    def fit(self, progress: bool = True) -> dict:
        cfg = self.cfg
        best, best_state, best_step, bad = -1.0, None, 0, 0
        history = []
        bar = tqdm(range(1, cfg.steps + 1), desc="train", disable=not progress)
        for step in bar:
            logs = self.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = self.validate()
                history.append({"step": step, "val_mAP": val, **logs})
                bar.set_postfix(val=f"{val:.3f}", best=f"{max(best, val):.3f}")
                if val > best:
                    best, best_step, bad = val, step, 0
                    best_state = {k: v.clone() for k, v in self.head.state_dict().items()}
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        log.info("early stop at step %d (best %.4f at %d)", step, best, best_step)
                        break
        self.head.load_state_dict(best_state)
        self.head.eval()
        return {"val_mAP": best, "best_step": best_step, "history": history}


# ----------------------------------------------------------------------------- entry points
def train(cfg: TrainConfig, data_root: Path, out: Optional[Path] = None, progress: bool = True,
          benchmarks: tuple = ("pacs", "doodle")) -> dict:
    """Train heads, pick the best step on held-out training classes, optionally save.

    Benchmark scores are computed after selection, for the record only.
    """
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.time()
    encoder = create_encoder(cfg.encoder, checkpoint="none")
    fs, items = load_training_features(encoder, data_root, cfg)
    text = class_text_features(fs.classes)
    held = split_classes(fs, cfg.val_fraction, cfg.seed)
    trainer = Trainer(cfg, fs, text, held)
    result = trainer.fit(progress=progress)
    diffusion_k, diffusion_val = trainer.choose_diffusion() if cfg.diffusion else (0, {})
    result.update(diffusion_k=diffusion_k, val_mAP_by_diffusion=diffusion_val)
    encoder.head = trainer.head
    encoder.meta = {"retrieval": {"diffusion_k": diffusion_k}}
    scores = {}
    from sbir_core.eval.evaluate import evaluate_split

    for split in benchmarks:
        for diffusion in (True, False):
            r = evaluate_split(encoder, data_root, split, diffusion=diffusion)
            key = split if diffusion else f"{split} (embedding only)"
            scores[key] = {k: r[k] for k in ("mAP@all", "P@100", "mAP@200", "P@200")}
    result.update(
        benchmarks=scores,
        train_classes=[c for c, hld in zip(fs.classes, held) if not hld],
        heldout_classes=[c for c, hld in zip(fs.classes, held) if hld],
        data_fingerprint=fingerprint(items),
        seconds=round(time.time() - t0, 1),
    )
    if out is not None:
        meta = {
            "encoder": cfg.encoder,
            "config": {**dataclasses.asdict(cfg)},
            "classes_trained_on": result["train_classes"],
            "heldout_classes": result["heldout_classes"],
            "excluded_splits": list(cfg.exclude),
            "data_fingerprint": result["data_fingerprint"],
            "val_mAP": result["val_mAP"],
            "retrieval": {"diffusion_k": diffusion_k, "val_mAP_by_diffusion_k": diffusion_val},
            "benchmarks": scores,
        }
        save_checkpoint(out, trainer.head, meta)
    result["encoder"] = encoder  # the trained encoder, for callers that evaluate further
    return result
