"""Class text: names in prompts, or names and WordNet definitions (`finetune --class-text`)."""
import copy
import json

import pytest
import torch

from scripts_loader import load_experiment
from shared_data import SHARED, needs_shared
from sbir_core.data.datasets import assert_texts_allowed, training_items
from sbir_core.errors import InputError
from sbir_core.models.text import CLASS_GLOSSES_FILE, class_glosses, class_text_features



def test_a_definition_moves_only_the_classes_that_have_one():
    glosses = class_glosses()
    assert "frog" in glosses and "garfield" not in glosses  # no WordNet sense fits Garfield the cat
    names = ["frog", "garfield", "violin"]
    plain = class_text_features(names)
    rich = class_text_features(names, class_text="glosses")
    torch.testing.assert_close(rich[1], plain[1])  # no definition: the name prompts alone
    for i in (0, 2):
        cos = float(plain[i] @ rich[i])
        assert 0.5 < cos < 0.99, cos  # moved, and still about the same thing
    torch.testing.assert_close(rich.norm(dim=1), torch.ones(3))
    with pytest.raises(InputError, match="unknown class text"):
        class_text_features(names, class_text="wikipedia")


def test_definitions_pick_the_visible_sense():
    glosses = class_glosses()
    assert "feline" in glosses["tiger"]  # WordNet's first sense is "a fierce or audacious person"
    assert "hand tool" in glosses["hammer"]  # not the part of a gunlock
    assert "amphibian" in glosses["frog"]


@needs_shared
def test_definitions_name_no_excluded_class_and_cover_only_training_classes():
    """The protocol: no unseen class's name reaches training text through a definition."""
    make = load_experiment("make_class_glosses")
    banned = make.banned_pattern(SHARED)
    glosses = json.loads(CLASS_GLOSSES_FILE.read_text())["glosses"]
    assert not [(c, g) for c, g in glosses.items() if banned.search(g.lower())]
    assert banned.search("a seat for one person") and banned.search("a breed of dogs")  # the rule bites
    assert not banned.search("a stop for a bus")  # whole class names, not their words ("stop sign")
    training = {it.label for it in training_items(SHARED)}
    assert set(glosses) <= training
    assert_texts_allowed(glosses, SHARED, ("pacs", "doodle"))
    assert len(glosses) > 0.9 * len(training)


def test_the_glosses_script_picks_the_first_visible_sense(tmp_path):
    """The script on a two-sense WordNet in its own file format (offsets are byte positions)."""
    make = load_experiment("make_class_glosses")
    senses = ["{:08d} 18 n 01 beluga 0 000 | a very large person",  # lexicographer file 18, person: not visible
              '{:08d} 05 n 01 beluga 0 000 | a small white toothed whale; "an example"']
    data, offsets = "  1 a licence line\n", []
    for s in senses:
        offsets.append(len(data))
        data += s.format(len(data)) + "\n"
    (tmp_path / "data.noun").write_text(data, encoding="latin-1")
    (tmp_path / "index.noun").write_text(f"beluga n 2 0 2 0 {offsets[0]:08d} {offsets[1]:08d}\n", encoding="latin-1")
    index, data_file = make.read_wordnet(tmp_path)
    assert make.gloss_for("beluga", index, data_file) == "a small white toothed whale"  # example cut off
    assert make.gloss_for("narwhal", index, data_file) is None


def test_text_queries_are_embedded_as_the_checkpoint_embedded_its_class_text(shipped_service):
    """A model trained with definitions searches typed words with them; one trained on names
    with the prompt ensemble alone (the shipped model)."""
    enc = copy.copy(shipped_service.encoder)  # its own `meta` below; the weights are shared, unchanged
    assert enc.class_text == "names"
    words = ["tiger", "a red bicycle", "the eiffel tower"]
    with torch.inference_mode():
        names = enc.encode_text(words)
        assert torch.allclose(names, enc.head.embed_text(class_text_features(words)), atol=1e-5)
        enc.meta = {**enc.meta, "config": {**enc.meta["config"], "class_text": "glosses"}}
        glossed = enc.encode_text(words)
    assert not torch.allclose(glossed[0], names[0], atol=1e-3)  # tiger has a definition
    assert not torch.allclose(glossed[2], names[2], atol=1e-3)  # so has "The Eiffel Tower", typed in lower case
    assert torch.allclose(glossed[1], names[1], atol=1e-5)  # a phrase that is no class has none
