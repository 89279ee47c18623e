"""Token shards (format, validation) and the loader (modes, resume, ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.manifest import totals, write_manifest
from lmforge.data.shards import HEADER_BYTES, Shard, token_dtype, write_shard
from lmforge.errors import ConfigError, InputError


def test_shard_round_trip(tmp_path):
    docs = [[1, 2, 3, 0], [70000, 0], [5, 0]]
    path = write_shard(tmp_path / "s.bin", docs, token_dtype(100_000))
    shard = Shard(path)
    assert shard.dtype.itemsize == 4 and shard.num_tokens == 8 and shard.num_documents == 3
    assert [shard.document(i).tolist() for i in range(3)] == docs
    assert path.stat().st_size == HEADER_BYTES + 8 * 4 + 4 * 8


def test_uint16_when_the_vocabulary_fits(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    shard = Shard(write_shard(tmp_path / "s.bin", [[65535, 1]], token_dtype(65536)))
    assert shard.dtype.itemsize == 2 and shard.tokens.tolist() == [65535, 1]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b"NOTSHARD" + b[8:], "bad magic"),
    (lambda b: b[:8] + (7).to_bytes(4, "little") + b[12:], "version 7"),
    (lambda b: b[:-5], "truncated or corrupt"),
    (lambda b: b[:10], "bad magic|truncated"),
])
def test_damaged_shards_are_named(tmp_path, damage, message):
    path = write_shard(tmp_path / "s.bin", [[1, 2, 3]], np.dtype(np.uint16))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InputError, match=rf"s\.bin: .*({message})"):
        Shard(path)


def make_data_dir(tmp_path, n_shards=3, per_shard=1000):
    """Shards holding the token stream 0, 1, 2, … so positions are easy to check."""
    shards = []
    for k in range(n_shards):
        tokens = np.arange(k * per_shard, (k + 1) * per_shard) % 60000
        write_shard(tmp_path / f"train_{k:05d}.bin", [tokens], np.dtype(np.uint16))
        shards.append({"path": f"train_{k:05d}.bin", "split": "train", "tokens": per_shard,
                       "documents": 1})
    write_manifest(tmp_path, {"shards": shards, **totals(shards)})
    return tmp_path


def test_sequential_windows_cross_shards_and_wrap(tmp_path):
    loader = TokenLoader(make_data_dir(tmp_path), "train", batch_size=4, seq_len=100,
                         mode="sequential")
    firsts = []
    for _ in range(10):  # 29 windows of 100: crosses both shard boundaries, then a new epoch
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == (4, 100)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y - x, torch.ones_like(x))  # consecutive stream positions
        firsts += x[:, 0].tolist()
    assert firsts[:29] == [100 * j for j in range(29)] and firsts[29:] == firsts[:11]


def test_random_mode_is_a_permutation_of_windows_per_epoch(tmp_path):
    loader = TokenLoader(make_data_dir(tmp_path), "train", batch_size=1, seq_len=100, seed=3)
    starts = [loader.next_batch()[0][0, 0].item() for _ in range(29)]
    assert sorted(starts) == [100 * j for j in range(29)] and starts != sorted(starts)
    again = [loader.next_batch()[0][0, 0].item() for _ in range(29)]
    assert sorted(again) == sorted(starts) and again != starts  # a new order each epoch


def test_random_mode_resumes_exactly(tmp_path):
    data = make_data_dir(tmp_path)
    straight = TokenLoader(data, "train", 3, 64, seed=7)
    expected = [straight.next_batch() for _ in range(10)]
    first = TokenLoader(data, "train", 3, 64, seed=7)
    for _ in range(4):
        first.next_batch()
    resumed = TokenLoader(data, "train", 3, 64, seed=7)
    resumed.load_state_dict(first.state_dict())
    for x, y in expected[4:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_state_from_a_different_loader_is_refused(tmp_path):
    data = make_data_dir(tmp_path)
    state = TokenLoader(data, "train", 3, 64, seed=7).state_dict()
    with pytest.raises(ConfigError, match="seed was 7, is 8"):
        TokenLoader(data, "train", 3, 64, seed=8).load_state_dict(state)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_see_disjoint_data_equal_to_one_process_with_accumulation(tmp_path, mode):
    data = make_data_dir(tmp_path)
    ranks = [TokenLoader(data, "train", 2, 50, mode=mode, seed=1, rank=r, world_size=3)
             for r in range(3)]
    single = TokenLoader(data, "train", 2, 50, mode=mode, seed=1)
    for _ in range(5):
        batches = [ld.next_batch()[0] for ld in ranks]
        for r in range(3):  # one process drawing 3 micro-batches per step reads the same windows
            assert torch.equal(single.next_batch()[0], batches[r])
        windows = [set(b[:, 0].tolist()) for b in batches]
        assert not (windows[0] & windows[1] or windows[0] & windows[2] or windows[1] & windows[2])


def test_too_little_data_is_a_clear_error(tmp_path):
    data = make_data_dir(tmp_path, n_shards=1, per_shard=100)
    with pytest.raises(InputError, match="too few for batches of 4×64"):
        TokenLoader(data, "train", 4, 64)
    with pytest.raises(InputError, match="no 'val' shards"):
        TokenLoader(data, "val", 1, 8)
    with pytest.raises(InputError, match="no manifest"):
        TokenLoader(tmp_path / "elsewhere", "train", 1, 8)
