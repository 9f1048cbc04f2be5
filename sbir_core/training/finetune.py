"""`finetune`: train the backbone and the heads end to end (encoder v2).

The image encoder itself (not only heads on frozen features) learns what sketches and
photos share:

- sketches: QuickDraw doodle strokes, re-rendered with augmentation every step;
- photos: Caltech photos (random crop, flip) and their edge maps as pseudo-sketches;
- MA-SBIR: every image is aligned with its class text (MiniLM prompt ensemble through
  the trainable text head); no sketch-photo pairs exist or are needed;
- ZSCMR: cross-modal triplets (sketch- and photo-anchored) and a photo <-> own
  edge-map instance term.

Benchmark classes never reach training (`data.training_items`), nor do the held-out
doodles. The best step is chosen on held-out *training* data by hit@5 and mAP@all: the
doodles of held-out classes and (`select`) held-out doodles of training classes outside
the product benchmark. Training resumes from `<out>.state.pt` after an interruption; a
step's batch depends on its step only (`finetune_data.StepBatches`), so `workers`
processes can make them ahead (what keeps a GPU busy) without changing the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sbir_core.data.preprocess import edges_as_sketch, preprocess_sketch
from sbir_core.data.datasets import fingerprint
from sbir_core.eval.metrics import map_all
from sbir_core.models.checkpoint import as_stored, load_backbone_state, save_checkpoint
from sbir_core.models.encoders import EfficientNetLiteBackbone
from sbir_core.models.heads import SBIRHead
from sbir_core.models.settings import PLAIN_SEARCH, RetrievalSettings
from sbir_core.training.config import FinetuneConfig
from sbir_core.training.losses import (cross_modal_triplets, imagenet_kept, instance_pairs, relations_kept,
                                      semantic_targets)
from sbir_core.training.finetune_data import (StepBatches, TrainData, _to_tensor, prepare_data, run_heldout_classes,
                                             training_text_features)

log = logging.getLogger(__name__)

SEEN_GALLERY = 2  # of each training class's held-out doodles, coloured as its gallery pictures
FIRST_ROW = ("hit@1", "hit@5", "P@5")  # what a retrieval setting may not cost any validation set
# Seen-class calibration settings tried (gallery.calibration): temperatures x strengths.
CALIBRATION_GRID = ((0.07, 0.1, 0.15, 0.2), (0.25, 0.5, 0.75, 1.0, 1.5, 2.0))


# ----------------------------------------------------------------------------- model
class FinetuneModel(nn.Module):
    """EfficientNet-Lite (trainable from a block on, batch-norm statistics frozen) + SBIRHead."""

    def __init__(self, cfg: FinetuneConfig, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = EfficientNetLiteBackbone(cfg.encoder, image_size=cfg.image_size)
        net = self.backbone.net
        for i, blk in enumerate(net.blocks):
            blk.requires_grad_(i >= cfg.freeze_blocks)
        net.conv_head.requires_grad_(True)
        net.bn2.requires_grad_(True)
        net.classifier.requires_grad_(cfg.w_imagenet > 0)  # the checkpoint drops it either way
        self.head = SBIRHead(self.backbone.pooled_dim, text_dim, cfg.embed_dim, cfg.hidden, cfg.dropout,
                             text_source="minilm")
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """x in [0, 1] -> retrieval embedding s (not normalised)."""
        return self.embed_and_classify(x, modality)[0]

    def embed_and_classify(self, x: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (retrieval embedding, the backbone's ImageNet logits) of x in [0, 1]."""
        feats = self.backbone.features((x - self.mean) / 0.5)
        return self.head.semantic(feats.pooled, modality), self.backbone.net.classifier(feats.raw)


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, td: TrainData, text: torch.Tensor, held: np.ndarray) -> None:
        self.cfg, self.td, self.held = cfg, td, held  # cfg checked its own values (FinetuneConfig)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                                   else cfg.device)
        self.model = FinetuneModel(cfg, text.shape[1]).to(self.device)
        self.text = text.float().to(self.device)
        self.train_classes = torch.from_numpy(np.flatnonzero(~held))
        self.remap = torch.full((len(td.classes),), -1, dtype=torch.long)
        self.remap[self.train_classes] = torch.arange(len(self.train_classes))
        self.remap = self.remap.to(self.device)
        self.text_targets = semantic_targets(self.text[self.train_classes], cfg.semantic_smoothing,
                                             cfg.semantic_temperature)
        self.p_idx = np.flatnonzero(~held[td.photo_labels])
        self.s_idx = np.flatnonzero(~held[td.sketch_labels])
        self.batches = StepBatches(cfg, td, self.p_idx, self.s_idx)
        self.lineage: list = []
        self.released: list = []  # held out of the start (`init`), trained on here
        if cfg.init:
            self._load_init(cfg.init)
        else:
            self._standardize()
        # SAKE-style knowledge preservation: the frozen ImageNet backbone knows how images of
        # classes it was never fine-tuned on relate; fine-tuning on training classes forgets it.
        self.teacher = (EfficientNetLiteBackbone(cfg.encoder, image_size=cfg.image_size)
                        if cfg.w_preserve or cfg.w_imagenet else None)
        if self.teacher is not None:
            self.teacher.to(self.device)
        bb = [p for p in self.model.backbone.parameters() if p.requires_grad]
        hd = list(self.model.head.parameters())
        # Batch-norm statistics stay frozen and the standardisation is fixed, so only the
        # parameters are averaged.
        self.ema = (torch.optim.swa_utils.AveragedModel(self.model, avg_fn=_ema_fn(cfg.ema))
                    if cfg.ema else None)
        self.opt = torch.optim.AdamW([{"params": bb, "lr": cfg.lr_backbone}, {"params": hd, "lr": cfg.lr_head}],
                                     weight_decay=cfg.weight_decay)
        warm, total = cfg.warmup, cfg.steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(total, 1)))))
        self.step_no = 0
        self.best = {"score": -1.0}
        self.best_state: Optional[dict] = None
        self.history: list = []
        self._seen: Optional[tuple] = None

    def _embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Embeddings of a CPU batch, computed on the training device, returned on the CPU."""
        return self.model.embed(x.to(self.device), modality).float().cpu()

    def _load_init(self, path: str) -> None:
        """Continue from a trained checkpoint (e.g. at another input size): its backbone and
        heads, feature standardisation included. Every class held out now must have been held
        out of it too (`run_heldout_classes`); it may have held out more."""
        from sbir_core.models.checkpoint import load_checkpoint

        head, meta = load_checkpoint(path)
        held = [c for c, h in zip(self.td.classes, self.held) if h]
        start = meta.get("heldout_classes")
        if start is not None and not set(held) <= set(start):
            raise ValueError(f"{path} trained on {sorted(set(held) - set(start))}, held out here; "
                             "it cannot be continued with these held-out classes")
        self.released = sorted(set(start or []) - set(held))
        load_backbone_state(self.model.backbone.net, meta["backbone_state"])
        self.model.head.load_state_dict(head.state_dict())
        # How the starting checkpoint was made, so a continued (or re-selected) model keeps it.
        self.lineage = list(meta.get("lineage") or []) + [
            {"checkpoint": Path(path).name, "config": meta.get("config"), "selection": meta.get("selection")}]
        log.info("starting from %s", path)

    @torch.no_grad()
    def _standardize(self, n: int = 192) -> None:
        """Per-modality feature standardisation, measured on training images at the start."""
        m = self.model.eval()
        rng = np.random.default_rng(self.cfg.seed + 7)
        bp = rng.choice(self.p_idx, min(n, len(self.p_idx)), replace=False)
        bs = rng.choice(self.s_idx, min(n, len(self.s_idx)), replace=False)
        xp = self.batches.photo_batch(bp, rng, train=False)
        xs = _to_tensor([preprocess_sketch(self.td.sketches[i], self.cfg.image_size) for i in bs])
        for k, x in enumerate((xp, xs)):
            f = torch.cat([m.backbone.features((c.to(self.device) - m.mean) / 0.5).pooled for c in x.split(64)])
            m.head.feat_mean[k] = f.mean(0)
            m.head.feat_std[k] = f.std(0) + 1e-3

    def step(self, batch: Optional[tuple] = None) -> dict:
        """One optimiser step on `batch` (default: this step's, made here)."""
        cfg, m = self.cfg, self.model
        m.train()
        m.backbone.net.eval()  # frozen batch-norm statistics: small mixed-modality batches
        batch = batch if batch is not None else self.batches[self.step_no]
        xp, xe, xs, yp, ys = (t.to(self.device, non_blocking=True) for t in batch)
        # ImageNet logits cost one small matrix product; they train only under w_imagenet.
        sp, lp = m.embed_and_classify(xp, "photo")  # photos, then doodles coloured like clip-art
        sk, lk = m.embed_and_classify(torch.cat([xe, xs]), "sketch")
        se = sk[: len(xe)]  # the edge maps; the doodles follow
        yk = torch.cat([yp[: len(xe)], ys])
        img, yimg = torch.cat([sp, sk]), torch.cat([yp, yk])
        st = m.head.embed_text(self.text[self.train_classes])
        logits = F.normalize(img, dim=-1) @ F.normalize(st, dim=-1).T / cfg.temperature
        y = self.remap[yimg]
        losses = {"text": F.cross_entropy(logits, y if self.text_targets is None else self.text_targets[y])}
        losses["triplet"] = cross_modal_triplets(F.normalize(sk, dim=-1), yk, F.normalize(sp, dim=-1), yp, cfg.margin)
        losses["pair"] = instance_pairs(sp[: len(se)], se, cfg.temperature)
        total = cfg.w_text * losses["text"] + cfg.w_triplet * losses["triplet"] + cfg.w_pair * losses["pair"]
        if cfg.w_preserve:
            losses["preserve"] = relations_kept(self.teacher, xp[: len(se)], sp[: len(se)], m.mean)
            total = total + cfg.w_preserve * losses["preserve"]
        if cfg.w_imagenet:
            x, lg = (xp, lp) if cfg.imagenet_images == "photos" else (torch.cat([xp, xe, xs]), torch.cat([lp, lk]))
            losses["imagenet"] = imagenet_kept(self.teacher, x, lg, m.mean, cfg.imagenet_temperature)
            total = total + cfg.w_imagenet * losses["imagenet"]
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(m)
        self.step_no += 1
        return {k: v.item() for k, v in losses.items()}

    @torch.no_grad()
    def validation_embeddings(self, max_photos: int = 30, distractors: int = 8, edges: bool = False):
        """Held-out training classes: their doodles (queries) and their photos, mixed (as in
        every real gallery) with a few photos of each training photo class.
        -> (queries, query labels, gallery, gallery labels), L2-normalised numpy."""
        td, S = self.td, self.cfg.image_size
        self.model.eval()
        hp = [i for c in np.flatnonzero(self.held) for i in np.flatnonzero(td.photo_labels == c)[:max_photos]]
        seen = np.unique(td.photo_labels[self.p_idx])
        hp += [i for c in seen for i in np.flatnonzero(td.photo_labels == c)[:distractors]]
        hs = np.flatnonzero(self.held[td.sketch_labels])
        g = torch.cat([self._embed(self.batches.photo_batch(hp[i:i + 64], None, train=False), "photo")
                       for i in range(0, len(hp), 64)])
        drawn = [_to_tensor([preprocess_sketch(td.sketches[j], S) for j in hs[i:i + 64]]) for i in range(0, len(hs), 64)]
        q = torch.cat([self._embed(x, "sketch") for x in drawn])
        if edges:  # the photos' edge maps seen as sketches (the inference-time view), mirrored queries
            e = torch.cat([self._embed(_to_tensor([self._edge_sketch(j) for j in hp[i:i + 64]]), "sketch")
                           for i in range(0, len(hp), 64)])
            qf = torch.cat([self._embed(x.flip(-1), "sketch") for x in drawn])
            return (F.normalize(q, dim=-1).numpy(), td.sketch_labels[hs], F.normalize(g, dim=-1).numpy(),
                    td.photo_labels[np.array(hp)], F.normalize(e, dim=-1).numpy(), F.normalize(qf, dim=-1).numpy())
        return (F.normalize(q, dim=-1).numpy(), td.sketch_labels[hs], F.normalize(g, dim=-1).numpy(),
                td.photo_labels[np.array(hp)])

    def _edge_sketch(self, i: int) -> Image.Image:
        e = self.td.edges[i].convert("RGB").resize((self.cfg.image_size,) * 2, Image.Resampling.BILINEAR)
        try:
            return preprocess_sketch(e, self.cfg.image_size)
        except ValueError:
            return e

    def _seen_split(self) -> tuple[list, np.ndarray, list, np.ndarray]:
        """Seen-class selection data, fixed for the run: per training class (not a held-out
        one), the first `SEEN_GALLERY` of its held-out doodles coloured like clip-art (a
        gallery picture of that class that no step trained on), the rest as queries.
        -> (query strokes, labels, gallery images, labels)."""
        if self._seen is None:
            td = self.td
            rng = np.random.default_rng(self.cfg.seed + 11)
            qs, ql, gs, gl = [], [], [], []
            for c in np.unique(td.val_doodle_labels):
                if self.held[c]:
                    continue
                idx = np.flatnonzero(td.val_doodle_labels == c)
                if len(idx) <= SEEN_GALLERY:
                    continue
                for j in idx[:SEEN_GALLERY]:
                    gs.append(self.batches.colored_view(j, rng, td.val_doodles)), gl.append(c)
                for j in idx[SEEN_GALLERY:]:
                    qs.append(td.val_doodles[j]), ql.append(c)
            self._seen = (qs, np.array(ql, np.int64), gs, np.array(gl, np.int64))
        return self._seen

    def validate(self) -> dict:
        """Selection metrics. Zero-shot: held-out classes' doodles against their photos among
        seen-class photos. Seen (when the data has held-out doodles of training classes): those
        doodles against clip-art-coloured held-out doodles of ~250 classes and the same photos,
        the case of a gallery class the model was trained on. `score` (what selection
        maximises) is the mean of hit@5 and mAP@all; with `select` "zero-shot+seen", averaged
        over both."""
        q, ql, g, gl = self.validation_embeddings()
        val = retrieval_summary(q @ g.T, ql, gl)
        val["score"] = 0.5 * (val["hit@5"] + val["mAP@all"])
        qs, qsl, gs, gsl = self._seen_split() if self.cfg.select == "zero-shot+seen" else ([], None, None, None)
        if len(qs):
            eq, eg = self._seen_embeddings()
            seen = retrieval_summary(eq @ np.concatenate([eg, g]).T, qsl, np.concatenate([gsl, gl]))
            val.update({f"seen_{k}": v for k, v in seen.items()})
            val["score"] = 0.5 * (val["score"] + 0.5 * (seen["hit@5"] + seen["mAP@all"]))
        return val

    def seen_prototypes(self) -> np.ndarray:
        """(C, D) L2-normalised class-text embeddings of the training classes, rounded to fp16
        as the checkpoint stores them (so selection sees what searches will)."""
        with torch.no_grad():
            t = F.normalize(self.model.head.embed_text(self.text[self.train_classes]).float(), dim=-1)
        return t.half().float().cpu().numpy()

    def choose_retrieval(self, edge_weights: tuple = (0.0, 0.25, 0.5, 0.75),
                         diffusion: tuple = (0, 3, 5, 10, 20),
                         calibration: tuple = CALIBRATION_GRID) -> tuple[RetrievalSettings, dict]:
        """How galleries are searched, chosen by what a person sees (hit@5, then P@5, then
        P@10: the first row, then the next) on held-out training data; mAP@all is reported
        but never decides:
        - edge weight w: a gallery photo's embedding is (1-w) photo + w (its edge map as a sketch);
        - flip: a sketch query averaged with its mirror image;
        - seen-class calibration (tau, beta), `gallery.calibration` (beta 0 = off);
        - gallery diffusion neighbours k (0 = off; the first five results stay plain, see
          gallery.index.PLAIN_HEAD, so k only reorders what follows them: chosen last, by P@10).
        Each setting is judged on every kind of gallery people search: the held-out classes'
        doodles against their photos among training-class photos (a mixed gallery) and against
        their photos alone (nothing seen), and, with `select` "zero-shot+seen", the seen split
        against clip-art-coloured doodles (what the default gallery holds); a setting's figures
        are the mean over the sets. A setting may not cost any one set its first row: its
        hit@1, hit@5 and P@5 there must stay within one standard error of plain search's
        (`_first_row_kept`). Of the settings whose mean hit@5 is within one standard error of
        the best, the cheapest wins (one-standard-error rule). -> (chosen setting, every setting's scores)."""
        from sbir_core.gallery.calibration import SeenCalibration
        from sbir_core.gallery.index import Gallery

        q, ql, g, gl, e, qf = self.validation_embeddings(edges=True)
        alone = np.isin(gl, np.unique(ql))
        sets = {"zero-shot": (q, qf, ql, g, e, gl), "zero-shot-alone": (q, qf, ql, g[alone], e[alone], gl[alone])}
        if self.cfg.select == "zero-shot+seen" and len(self._seen_split()[0]):
            _, sql, _, sgl = self._seen_split()
            sq, sg, sqf, se = self._seen_embeddings(views=True)
            sets["seen"] = (sq, sqf, sql, np.concatenate([sg, g]), np.concatenate([se, e]), np.concatenate([sgl, gl]))
        protos = self.seen_prototypes()

        def judge(w: float, k: int, flip: bool, tau: float, beta: float) -> dict:
            cal = SeenCalibration(protos, tau, beta) if beta else None
            rows = {}
            for name, (q0, q1, lq, g0, e0, lg) in sets.items():
                queries = q0 + q1 if flip else q0
                queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
                sim = Gallery.from_embeddings(g0 * (1 - w) + e0 * w, diffusion_k=k, calibration=cal).score_all(queries)
                rows[name] = retrieval_summary(sim, lq, lg)
            row = {m: float(np.mean([r[m] for r in rows.values()])) for m in ("hit@1", "hit@5", "P@5", "P@10", "mAP@all")}
            row.update({f"{n}_{m}": r[m] for n, r in rows.items() for m in ("hit@1", "hit@5", "P@5", "mAP@all")})
            return {"edge_weight": w, "diffusion_k": k, "flip_sketch": flip,
                    "seen_calibration": {"tau": tau, "beta": beta} if beta else None, **row}

        def label(r: dict) -> str:
            c = r["seen_calibration"] or {"tau": 0, "beta": 0}
            return f"w={r['edge_weight']},k={r['diffusion_k']},flip={int(r['flip_sketch'])},tau={c['tau']},beta={c['beta']}"

        scores = {}
        for flip in (False, True):
            for w in edge_weights:
                for tau, beta in [(1.0, 0.0)] + [(t, b) for t in calibration[0] for b in calibration[1]]:
                    r = judge(w, 0, flip, tau, beta)
                    scores[label(r)] = r
        plain = scores.get("w=0.0,k=0,flip=0,tau=0,beta=0") or judge(0.0, 0, False, 1.0, 0.0)
        n_queries = {n: len(v[0]) for n, v in sets.items()}
        kept = [r for r in scores.values() if _first_row_kept(r, plain, n_queries)]
        top = max(kept, key=lambda r: (round(r["hit@5"], 3), round(r["P@5"], 3), round(r["P@10"], 3)))
        # One-standard-error rule: 120-query sets cannot tell settings a query or two apart,
        # so among those within one standard error of the best mean hit@5, the cheapest
        # (fewest passes, least fusion, weakest calibration), then the best first row.
        band = top["hit@5"] - math.sqrt(sum(top[f"{n}_hit@5"] * (1 - top[f"{n}_hit@5"]) / max(k, 1)
                                            for n, k in n_queries.items())) / len(n_queries)

        def cost(r: dict) -> tuple:
            c = r["seen_calibration"] or {"beta": 0.0}
            return (r["flip_sketch"], r["edge_weight"], c["beta"])

        best = min((r for r in kept if r["hit@5"] >= band - 1e-9),
                   key=lambda r: (*cost(r), -round(r["hit@5"], 3), -round(r["P@5"], 3), -round(r["P@10"], 3)))
        c = best["seen_calibration"] or {"tau": 1.0, "beta": 0.0}
        for k in diffusion[1:]:
            r = judge(best["edge_weight"], k, best["flip_sketch"], c["tau"], c["beta"])
            scores[label(r)] = r
            if (round(r["P@10"], 3), -k) > (round(best["P@10"], 3), -best["diffusion_k"]):
                best = r
        return RetrievalSettings.from_meta({k: best[k] for k in ("edge_weight", "diffusion_k", "flip_sketch",
                                                                 "seen_calibration")}), scores

    @torch.no_grad()
    def _seen_embeddings(self, views: bool = False) -> tuple:
        """The seen split (`_seen_split`) embedded, L2-normalised: (queries, clip-art gallery),
        and with `views` also the queries' mirror images and the gallery's edge maps
        (`edges_as_sketch`, as indexing makes them), which `choose_retrieval` weighs."""
        qs, _, gs, _ = self._seen_split()
        S = self.cfg.image_size
        self.model.eval()
        drawn = [_to_tensor([preprocess_sketch(x, S) for x in qs[i:i + 64]]) for i in range(0, len(qs), 64)]
        chunks = [gs[i:i + 64] for i in range(0, len(gs), 64)]
        out = [torch.cat([self._embed(x, "sketch") for x in drawn]),
               torch.cat([self._embed(_to_tensor(c), "photo") for c in chunks])]
        if views:
            out += [torch.cat([self._embed(x.flip(-1), "sketch") for x in drawn]),
                    torch.cat([self._embed(_to_tensor([edges_as_sketch(x, S) for x in c]), "sketch") for c in chunks])]
        return tuple(F.normalize(t, dim=-1).numpy() for t in out)

    @torch.no_grad()
    def fp16_check(self) -> dict:
        """Does storing the weights in fp16 change what users see? Validation with backbone
        and heads as the checkpoint stores them (`models.checkpoint.as_stored`) against fp32."""
        full = self.validate()
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(as_stored(state))  # copied into the fp32 parameters, rounded
        half = self.validate()
        self.model.load_state_dict(state)
        return {"fp32": full, "fp16": half}

    # ---- resumable state
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step_no, "best": self.best, "best_state": self.best_state,
                "history": self.history, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.step_no, self.best, self.best_state, self.history = st["step"], st["best"], st["best_state"], st["history"]
        torch.set_rng_state(st["torch_rng"])
        if st.get("cuda_rng") is not None and self.device.type == "cuda":  # dropout's RNG on the GPU
            torch.cuda.set_rng_state_all(st["cuda_rng"])

    def fit(self, state_file: Optional[Path] = None) -> dict:
        cfg = self.cfg
        if state_file and state_file.is_file():
            self.load_state(torch.load(state_file, map_location="cpu", weights_only=False))
            log.info("resumed at step %d", self.step_no)
        t0, run = time.time(), {}
        # Batches are made ahead by `workers` processes; each is a function of its step only,
        # so the run is the same with any number of workers.
        batches = iter(torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=range(self.step_no, cfg.steps), num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
            generator=torch.Generator().manual_seed(cfg.seed)))  # its seed draw leaves dropout's RNG alone
        if cfg.init and self.step_no == 0 and cfg.steps:
            self._keep_if_best(self.validate())  # a continuation must beat where it started
        while self.step_no < cfg.steps:
            logs = self.step(next(batches))
            for k, v in logs.items():
                run[k] = 0.9 * run.get(k, v) + 0.1 * v
            if self.step_no % 25 == 0:
                log.info("step %d/%d %s (%.2f s/step)", self.step_no, cfg.steps,
                         " ".join(f"{k}={v:.3f}" for k, v in run.items()), (time.time() - t0) / 25)
                t0 = time.time()
            if self.step_no % cfg.val_every == 0 or self.step_no == cfg.steps:
                with self._averaged():
                    self._keep_if_best(self.validate(), run)
                if state_file:
                    tmp = state_file.with_suffix(".tmp")
                    torch.save(self.state(), tmp)
                    os.replace(tmp, state_file)
        if self.best_state is None:  # no steps to take (e.g. --steps 0 with --init): the model as it is
            self.best = {"step": self.step_no, **self.validate()}
            self.best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.best_state)
        return {"best": self.best, "history": self.history}

    @contextlib.contextmanager
    def _averaged(self):
        """The model holds the averaged weights inside (when `ema` is on), its own after."""
        if self.ema is None:
            yield
            return
        own = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.model.load_state_dict(own)

    def _keep_if_best(self, val: dict, run: Optional[dict] = None) -> None:
        self.history.append({"step": self.step_no, **val, **(run or {})})
        log.info("val step %d: %s", self.step_no, json.dumps(val))
        if val["score"] > self.best["score"]:
            self.best = {"step": self.step_no, **val}
            self.best_state = {k: v.clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def choose_interpolation(self) -> tuple[float, dict]:
        """WiSE-FT (Wortsman et al. 2022): mix the trained backbone's weights with its ImageNet
        start, a*trained + (1-a)*ImageNet, which keeps more of what ImageNet knew about classes
        training never saw. The mix is chosen like a training step (mean of hit@5 and mAP@all on
        held-out classes); ties go to the larger a. The model is left with the chosen mix.
        -> (a, every a's validation)."""
        if set(self.cfg.interpolate) == {1.0}:  # off (the default): the selected model as it is
            return 1.0, {"1.0": dict(self.best)}
        net = self.model.backbone.net
        trained = {k: v.clone() for k, v in net.state_dict().items()}
        teacher = self.teacher or EfficientNetLiteBackbone(self.cfg.encoder, image_size=self.cfg.image_size)
        # the ImageNet weights (the preservation teacher's, if any), where the model is
        start = {k: v.to(self.device) for k, v in teacher.net.state_dict().items()}
        rows = {}
        for a in sorted(set(self.cfg.interpolate), reverse=True):
            if not 0.0 < a <= 1.0:
                raise ValueError(f"interpolation weights are in (0, 1], got {a}")
            net.load_state_dict(_mix(trained, start, a))
            rows[str(a)] = self.validate()
        best = max(rows, key=lambda a: (round(rows[a]["score"], 4), float(a)))
        net.load_state_dict(_mix(trained, start, float(best)))
        return float(best), rows


def _ema_fn(decay: float):
    """EMA update with TensorFlow's `num_updates` warm-up: the decay ramps as (1 + n) / (10 + n)
    up to `decay`, so early validations are not dominated by the starting weights."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"the EMA decay is in (0, 1), not {decay}")

    def avg(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return d * averaged + (1.0 - d) * current
    return avg


def _mix(trained: dict, start: dict, a: float) -> dict:
    """a*trained + (1-a)*start for float tensors (batch-norm counters stay as trained)."""
    return {k: a * v + (1 - a) * start[k] if v.is_floating_point() else v for k, v in trained.items()}


def _first_row_kept(row: dict, plain: dict, n_queries: dict) -> bool:
    """Does `row` keep every validation set's first row? Its hit@1, hit@5 and P@5 on each set
    may fall below plain search's by at most one standard error (binomial, sqrt(p(1-p)/n)):
    a setting must not win the mean on one kind of gallery by losing what people see on
    another (seen-class calibration, for one, can cost drawings of training classes their
    first result)."""
    for name, n in n_queries.items():
        for m in FIRST_ROW:
            p = plain[f"{name}_{m}"]
            if row[f"{name}_{m}"] < p - math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)) - 1e-9:
                return False
    return True


def retrieval_summary(sim: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray) -> dict:
    """hit@1, hit@5, P@5, P@10, mAP@all of a similarity matrix (queries x gallery)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    rel = g_labels[order] == q_labels[:, None]
    return {
        "hit@1": float(rel[:, :1].any(1).mean()),
        "hit@5": float(rel[:, :5].any(1).mean()),
        "P@5": float(rel[:, :5].mean()),
        "P@10": float(rel[:, :10].mean()),
        "mAP@all": float(map_all(sim, q_labels, g_labels)),
        "n_queries": int(len(q_labels)),
    }


# ----------------------------------------------------------------------------- entry point
def finetune(cfg: FinetuneConfig, data_root: Path, out: Path, cache: Optional[Path] = None) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    td, items = prepare_data(data_root, cfg, cache)
    text = training_text_features(data_root, td.classes, cfg.class_text)
    held = run_heldout_classes(td, cfg, data_root)
    ft = Finetuner(cfg, td, text, held)
    log.info("training on %d photos, %d doodles, %d classes (%d held out for selection)",
             len(ft.p_idx), len(ft.s_idx), len(td.classes), int(held.sum()))
    result = ft.fit(out.with_suffix(".state.pt"))
    alpha, by_alpha = ft.choose_interpolation()
    log.info("backbone interpolation %s chosen on held-out classes from %s", alpha,
             json.dumps({a: round(v["score"], 4) for a, v in by_alpha.items()}))
    if cfg.choose_settings:
        chosen, by_setting = ft.choose_retrieval()
        log.info("retrieval %s chosen on held-out classes from %s", chosen,
                 json.dumps({s: {m: round(v[m], 3) for m in ("hit@5", "P@5", "P@10", "mAP@all")}
                             for s, v in by_setting.items()}))
        fp16 = ft.fp16_check()
        log.info("fp16 check: %s", json.dumps(fp16))
        # How sure searches are ("sure", "not in this gallery?") is calibrated on the saved
        # model as the app runs it: `calibrate-confidence` (eval.confidence).
        retrieval = chosen.merged_into({"validation": by_setting})
    else:
        chosen, fp16 = PLAIN_SEARCH, None  # the embedding's cosine alone
        retrieval = chosen.merged_into(
            {"note": "not chosen (--no-choose-settings run): choose with finetune --init THIS --steps 0"})
        log.info("--no-choose-settings: searched plainly until a run with --init and --steps 0 chooses how")
    ft.model.head.photo_edge_weight = chosen.edge_weight
    ft.model.head.config["photo_edge_weight"] = chosen.edge_weight
    meta = {
        "encoder": cfg.encoder,
        "image_size": cfg.image_size,
        "backbone_trained": True,
        "config": dataclasses.asdict(cfg),
        "classes_trained_on": [c for c, h in zip(td.classes, held) if not h],
        "heldout_classes": [c for c, h in zip(td.classes, held) if h],
        "released_classes": ft.released,  # held out of the start (`init`), trained on here
        "excluded_splits": list(cfg.exclude),
        "heldout_doodles": "last 5 of each QuickDraw class (data.HELDOUT_DOODLES)",
        "data_fingerprint": fingerprint(items),
        "selection": result["best"],
        "interpolation": {"chosen": alpha, "validation": by_alpha},
        "retrieval": retrieval,
        "fp16_check": fp16,
        "lineage": ft.lineage,  # the runs before this one (oldest first), when it started from one
    }
    prototypes = torch.from_numpy(ft.seen_prototypes())  # where the model and text features are (a GPU)
    ft.model.cpu()
    save_checkpoint(out, ft.model.head, meta, backbone=ft.model.backbone.net, prototypes=prototypes)
    result["seconds"] = round(time.time() - t0, 1)
    return result
