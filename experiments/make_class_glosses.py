#!/usr/bin/env python3
"""Write one WordNet definition per training class (an experiment, docs/EXPERIMENTS.md,
"Class text with dictionary definitions"):

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python experiments/make_class_glosses.py --wordnet /tmp/wn/usr/share/wordnet \
        --out sbir_core/models/class_glosses.json

`finetune --class-text glosses` then aligns images with the class name prompts plus
"NAME: DEFINITION" (models/text.py). Why: a name alone tells the text encoder little about
what a thing looks like; a definition ("any of various tailless stout-bodied amphibians with
long hind limbs for leaping") does, and unseen classes only ever profit from the geometry the
training text gives the embedding.

Which sense: the first (most frequent) WordNet noun sense that names a visible thing
(lexicographer files animal, artifact, body, food, object, plant, shape, phenomenon,
location), else the first sense; "tiger" is then the cat, not "a fierce or audacious person".
Names WordNet lacks fall back to their head word ("ceiling fan" -> fan), else get none.
The protocol: a definition that names an excluded class (any of the benchmarks' unseen
class names as a whole word or phrase, singular or plural, e.g. "a seat for one person") is
dropped, so no unseen class name reaches training text through it. Only training classes are written.

Finding: definitions help the seen classes a little and cost zero-shot ones, all within the seed spread; `--class-text glosses` stays an option, off.
Backs: docs/EXPERIMENTS.md §5, "Class text with dictionary definitions" (and docs/TRAINING.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from sbir_core.data.datasets import DATA_HELP, data_root, excluded_names, load_splits, training_items

# WordNet's licence asks for this notice on every copy of (parts of) the database.
WORDNET_LICENCE = """\
This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same.
"""
VISIBLE = {5, 6, 8, 13, 15, 17, 19, 20, 25}  # lexicographer files of visible things
HEAD_FIRST = ("face", "head", "body")  # Caltech "cougar face": the animal is the first word
# Where the rule above picks a wrong sense (read from the full list this script's --show prints):
# class -> (lemma, sense index); None: no definition fits (Garfield the cat is not in WordNet).
SENSES = {
    "barrel": ("barrel", 1), "beaver": ("beaver", 6), "belt": ("belt", 1), "book": ("book", 1),
    "cake": ("cake", 2), "calendar": ("calendar", 2), "castle": ("castle", 1), "church": ("church", 1),
    "crown": ("crown", 3), "golf club": ("golf_club", 1), "hammer": ("hammer", 1), "line": ("line", 3),
    "marker": ("marker", 2), "matches": ("match", 0), "nail": ("nail", 1), "paint can": ("can", 0),
    "passport": ("passport", 1), "power outlet": ("outlet", 1), "radio": ("radio", 1), "rake": ("rake", 2),
    "sea horse": ("sea_horse", 1), "star": ("star", 4), "stitches": ("stitch", 0), "table": ("table", 1),
    "television": ("television", 2), "toaster": ("toaster", 1), "van": ("van", 4),
    "water lilly": ("water_lily", 0), "whale": ("whale", 1), "garfield": None,
    "angel": ("angel", 0), "cloud": ("cloud", 1), "dragon": ("dragon", 0), "lobster": ("lobster", 1),
    "lollipop": ("lollipop", 1), "lotus": ("lotus", 2), "microwave": ("microwave", 1), "mug": ("mug", 3),
    "nautilus": ("nautilus", 1), "pants": ("trouser", 0), "swing set": ("swing", 1), "toilet": ("toilet", 1),
}


def read_wordnet(root: Path) -> tuple[dict[str, list[int]], Path]:
    """lemma -> noun synset offsets in sense order (index.noun)."""
    index: dict[str, list[int]] = {}
    for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
        if not line or line.startswith(" "):
            continue
        p = line.split()
        n_ptr = int(p[3])
        index[p[0]] = [int(o) for o in p[4 + n_ptr + 2:]]
    return index, root / "data.noun"


def synset(data: Path, offset: int) -> tuple[int, str]:
    """(lexicographer file, definition without its examples) of one noun synset."""
    with data.open("rb") as f:
        f.seek(offset)
        line = f.readline().decode("latin-1")
    lexfile = int(line.split()[1])
    gloss = line.split("|", 1)[1].strip()
    return lexfile, gloss.split(";")[0].strip().strip('"').strip()


def lemmas(name: str) -> list[str]:
    """WordNet spellings to try for a class name, best first."""
    base = re.sub(r"^the ", "", name.lower().strip())
    words = base.replace("-", " ").split()
    tries = ["_".join(words), "".join(words), base.replace(" ", "_")]  # t-shirt keeps its hyphen
    if len(words) > 1:  # WordNet hyphenates some compounds: hot-air_balloon
        tries.append("_".join(["-".join(words[:2])] + words[2:]))
    tries.append("_".join(words).rstrip("s"))  # flip flops -> flip_flop
    if len(words) > 1:
        tries.append(words[0] if words[-1] in HEAD_FIRST else words[-1])
    return tries


def banned_pattern(data: Path) -> re.Pattern:
    """Every class name the benchmarks exclude, as a whole word or phrase, singular or plural."""
    ex = excluded_names(load_splits(data), ("pacs", "doodle"))["text"] | {"people"}
    names = sorted({re.sub(r"[\s_]+", " ", n.lower()).strip() for n in ex}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")(s|es)?\b")


def gloss_for(name: str, index: dict, data_file: Path) -> str | None:
    if name in SENSES:
        return None if SENSES[name] is None else synset(data_file, index[SENSES[name][0]][SENSES[name][1]])[1]
    for lemma in lemmas(name):
        if lemma in index:
            senses = [synset(data_file, o) for o in index[lemma]]
            visible = [g for lex, g in senses if lex in VISIBLE]
            return (visible or [senses[0][1]])[0]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="folder with index.noun, data.noun")
    ap.add_argument("--data", help=DATA_HELP)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sbir_core/models/class_glosses.json")
    ap.add_argument("--show", action="store_true", help="print every class with its definition")
    args = ap.parse_args(argv)
    args.data = data_root(args.data)
    if not (args.wordnet / "index.noun").is_file():
        raise SystemExit(f"error: no WordNet index.noun in {args.wordnet} (see this script's help)")
    index, data_file = read_wordnet(args.wordnet)
    banned = banned_pattern(args.data)
    classes = sorted({it.label for it in training_items(args.data)})
    glosses, dropped, missing = {}, [], []
    for c in classes:
        g = gloss_for(c, index, data_file)
        if g is None:
            missing.append(c)
        elif banned.search(g.lower()):
            dropped.append(c)
        else:
            glosses[c] = g
    if args.show:
        print("\n".join(f"{c:24s} {g}" for c, g in glosses.items()))
    args.out.write_text(json.dumps({
        "source": "WordNet 3.0 (Princeton University), Debian package wordnet-base 1:3.0-37",
        "licence": WORDNET_LICENCE.splitlines(),
        "made_by": "experiments/make_class_glosses.py", "glosses": glosses}, indent=1, sort_keys=False) + "\n")
    print(f"{len(glosses)} of {len(classes)} training classes have a definition; {len(dropped)} dropped for "
          f"naming an excluded class ({', '.join(dropped)}); {len(missing)} not in WordNet ({', '.join(missing)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
