"""Reading task files: skipped rows, column errors, seeded caps, the token cache, batches."""

import numpy as np
import pytest

from mtbert.data import EncodedSet, TaskSampler, read_examples, sample_indices, tokenize_cached
from mtbert.errors import DataError
from mtbert.tasks import TASKS
from mtbert.tokenize import Tokenizer

from conftest import SHARED_DATA


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "quora.csv"
    path.write_text("\tid\tsentence1\tsentence2\tis_duplicate\n"
                    "0\ta\tgood movie\tgreat film\t1.0\n"
                    "1\tb\tgood movie\t\t0.0\n"         # empty text
                    "2\tc\tgood movie\tbad film\t\n"    # empty label
                    "3\td\tgood movie\tbad film\t0.7\n"  # out of range
                    "4\te\tgood movie\n"                # short row
                    "5\tf\tthe plot\tthe story\t0.0\n")
    examples = read_examples(path, TASKS["qqp"])
    assert examples.ids == ["a", "f"]
    assert examples.labels.tolist() == [1.0, 0.0]
    assert examples.stats.rows == 6 and examples.stats.skipped == 4
    assert examples.stats.reasons == {"empty text": 1, "empty label": 1,
                                      "label out of range": 1, "short row": 1}


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("\tid\tsentence1\tsentence2\tscore\n0\ta\tx\ty\t1.0\n")
    with pytest.raises(DataError, match=r"sts.csv: missing column 'similarity' \(found: id, "
                                        r"sentence1, sentence2, score\)"):
        read_examples(path, TASKS["sts"])
    assert read_examples(path, TASKS["sts"], labelled=False).ids == ["a"]  # prediction files


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist; get the task files"):
        read_examples(tmp_path / "nope.csv", TASKS["sst"])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_real_quora_train_has_two_bad_rows():
    examples = read_examples(SHARED_DATA / "quora-train.csv", TASKS["qqp"])
    assert examples.stats.skipped == 2
    assert len(examples.ids) == 16000


def test_cap_is_a_seeded_sample_not_the_first_rows():
    a = sample_indices(1000, 100, seed=0, key="sst/train")
    assert len(a) == 100 and len(set(a)) == 100
    assert a.tolist() == sample_indices(1000, 100, seed=0, key="sst/train").tolist()
    assert a.tolist() != sample_indices(1000, 100, seed=1, key="sst/train").tolist()
    assert a.max() > 500 and a.tolist() != list(range(100))
    assert sample_indices(50, 100, seed=0, key="x").tolist() == list(range(50))
    assert sample_indices(50, 0, seed=0, key="x").tolist() == list(range(50))


def test_token_cache_is_written_once_and_reused(tmp_path, tiny_encoder, task_dir, monkeypatch):
    tokenizer = Tokenizer(tiny_encoder)
    examples = read_examples(task_dir / "quora-train.csv", TASKS["qqp"])
    first = tokenize_cached(examples, tokenizer, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("qqp-*.npz"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))
    monkeypatch.setattr(Tokenizer, "encode", lambda *a: pytest.fail("cache not used"))
    second = tokenize_cached(examples, tokenizer, tmp_path / "cache")
    assert [[x.tolist() for x in col] for col in first] == [[x.tolist() for x in col]
                                                            for col in second]


def test_pairs_truncate_longest_first_and_batches_pad_to_longest(tiny_encoder):
    tokenizer = Tokenizer(tiny_encoder)
    ids, types = tokenizer.build_inputs(np.arange(10, 20), np.arange(30, 33), max_length=10)
    assert ids.tolist() == [tokenizer.cls_id, 10, 11, 12, 13, tokenizer.sep_id, 30, 31, 32,
                            tokenizer.sep_id]
    assert types.tolist() == [0] * 6 + [1] * 4


def test_batch_shapes_and_padding(tmp_path, tiny_encoder):
    path = tmp_path / "sst.csv"
    path.write_text("\tid\tsentence\tsentiment\n0\ta\tgood\t1\n1\tb\tgood movie great plot\t2\n"
                    "2\tc\tbad film\t0\n")
    tokenizer = Tokenizer(tiny_encoder)
    examples = read_examples(path, TASKS["sst"])
    data = EncodedSet(examples, tokenize_cached(examples, tokenizer, None), tokenizer,
                      max_length=32, siamese=False)
    batch = data.batch(np.array([0, 2]))
    ids, mask, types = batch.views[0]
    # [CLS] bad film [SEP], the longest of the two (4), rounded up to a multiple of 8
    assert ids.shape == (2, 8)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch.labels.tolist() == [1.0, 0.0]
    data.pad_multiple = 1  # padded to the longest member
    ids, mask, types = data.batch(np.array([0, 2])).views[0]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    covered = np.concatenate([b.indices for b in data.batches(2)])
    assert sorted(covered.tolist()) == [0, 1, 2]


def test_sampler_passes_are_permutations_and_resumable():
    sampler = TaskSampler(10, 4, seed=0, task="sst")
    first_pass = np.concatenate([sampler.next() for _ in range(3)])
    assert sorted(first_pass.tolist()) == list(range(10))
    state = sampler.state()
    expected = [sampler.next().tolist() for _ in range(4)]
    other = TaskSampler(10, 4, seed=0, task="sst")
    other.restore(state)
    assert [other.next().tolist() for _ in range(4)] == expected
