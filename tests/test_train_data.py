"""DDP ranks consume disjoint micro-batches of the packed training data.

``rank_batches`` is run on the real packed Ray Dataset (``packed_dataset``) through a
``DataIterator``, as the training workers read it, and checked against the rule written out
here: the dataset's blocks in their fixed order, cut into global micro-batches of
``batch_size`` (an incomplete last one dropped); global micro-batch g goes to rank g % W.
"""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch
from model_dirs import sample_texts

from nexus.stages.train.data import packed_dataset, rank_batches

SEQ, BATCH = 16, 3


@pytest.fixture(scope="module")
def blocks_and_dataset(ray_cluster, tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("rank_data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(120)))
    ds = packed_dataset([str(path)], str(tiny_model_dir), seq_len=SEQ)
    blocks = np.stack([np.asarray(r["input_ids"], dtype=np.int64) for r in ds.take_all()])
    return blocks, ds


def _global_batch(blocks: np.ndarray, g: int) -> np.ndarray:
    return blocks[g * BATCH : (g + 1) * BATCH]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_micro_batches_that_cover_the_epoch(blocks_and_dataset, world):
    blocks, ds = blocks_and_dataset
    n_global = len(blocks) // BATCH
    assert n_global >= 2 * world  # enough data for the check to mean something
    owner: dict[int, int] = {}
    for rank in range(world):
        got = [
            (b.numpy(), e)
            for b, e in rank_batches(ds.iterator(), batch_size=BATCH, rank=rank, world=world, cycle=False)
        ]
        mine = [g for g in range(n_global) if g % world == rank]
        assert len(got) == len(mine)
        for (batch, epoch), g in zip(got, mine, strict=True):
            assert epoch == 0 and batch.dtype == np.int64
            np.testing.assert_array_equal(batch, _global_batch(blocks, g))
            assert g not in owner  # no micro-batch goes to two ranks
            owner[g] = rank
    assert sorted(owner) == list(range(n_global))  # together the ranks read the whole epoch once


def test_skip_resumes_and_cycling_repeats_the_same_order(blocks_and_dataset):
    blocks, ds = blocks_and_dataset
    world, rank = 2, 1
    mine = [g for g in range(len(blocks) // BATCH) if g % world == rank]
    it = rank_batches(ds.iterator(), batch_size=BATCH, rank=rank, world=world)
    two_epochs = list(islice(it, 2 * len(mine)))
    assert [e for _, e in two_epochs] == [0] * len(mine) + [1] * len(mine)
    for (batch, _), g in zip(two_epochs, mine + mine, strict=True):
        np.testing.assert_array_equal(batch.numpy(), _global_batch(blocks, g))
    skip = len(mine) - 1  # resume one micro-batch before the end of the first epoch
    resumed = list(
        islice(rank_batches(ds.iterator(), batch_size=BATCH, rank=rank, world=world, skip=skip), 3)
    )
    for (a, ea), (b, eb) in zip(resumed, two_epochs[skip:], strict=False):
        assert ea == eb and torch.equal(a, b)


def expected_data_digests(blocks: np.ndarray, world: int, batch_size: int, micro_batches: int) -> list[str]:
    """Each rank's ``data_digests`` entry after ``micro_batches`` micro-batches: the hash chain
    ``sha256(previous || int64 bytes)`` over its share (g % world == rank), epochs repeating."""
    import hashlib

    n_global = len(blocks) // batch_size
    out = []
    for rank in range(world):
        share = [g for g in range(n_global) if g % world == rank]
        digest = ""
        for i in range(micro_batches):
            g = share[i % len(share)]
            data = blocks[g * batch_size : (g + 1) * batch_size].astype(np.int64).tobytes()
            digest = hashlib.sha256(digest.encode() + data).hexdigest()
        out.append(digest)
    return out
