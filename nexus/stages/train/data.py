"""Packed fixed-length training blocks from a corpus, on Ray Data.

Documents are tokenised, joined with an end-of-text token between them and cut into
blocks of ``seq_len`` tokens (the tail of each batch of documents that does not fill a
block is dropped). Blocks are materialised once and read in a fixed order, and worker
``r`` of ``W`` takes global micro-batches ``r, r + W, r + 2W, ...``; that makes the data
each rank sees at each step a pure function of the step, which is what exact resume and
reproducible runs need (Ray Data's dynamic ``streaming_split`` is not).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import ray
import torch

from nexus.data.arrow import list_rows
from nexus.data.corpus import read_corpus, tokenize_corpus
from nexus.data.packing import join_documents, pack_blocks
from nexus.errors import NexusError, user_errors
from nexus.models.loading import load_tokenizer


def _pack_batch(batch, seq_len: int, eos_id: int):
    stream = join_documents(list_rows(batch, "input_ids", np.int32), eos_id, dtype=np.int32)
    return {"input_ids": pack_blocks(stream, seq_len)}


def packing(cfg, skipped=None) -> dict:
    """:func:`packed_dataset`'s settings from a train or distill config: both stages pack
    through this one mapping, so distill scores exactly the blocks training reads."""
    return dict(
        seq_len=cfg.seq_len,
        text_field=cfg.text_field,
        corpus_format=cfg.corpus_format,
        text_unit=cfg.text_unit,
        max_doc_tokens=cfg.max_doc_tokens,
        trust_remote_code=cfg.trust_remote_code,
        skipped=skipped,
    )


def packed_dataset(
    paths: list[str],
    tokenizer_dir: str,
    *,
    seq_len: int,
    text_field: str = "text",
    corpus_format: str = "auto",
    text_unit: str = "line",
    max_doc_tokens: int | None = 4096,
    docs_per_pack: int = 512,
    trust_remote_code: bool = False,
    skipped=None,
):
    """A materialised Ray Dataset of ``input_ids`` blocks [seq_len] (int32), in a fixed order.

    ``skipped``: a :class:`nexus.data.corpus.SkippedDocuments` to skip damaged documents into.
    """
    tok = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    quiet_data_progress()
    ds = read_corpus(paths, text_field, file_format=corpus_format, text_unit=text_unit, skipped=skipped)
    ds = tokenize_corpus(
        ds, tokenizer_dir, max_doc_tokens=max_doc_tokens, trust_remote_code=trust_remote_code
    )
    ds = ds.map_batches(
        _pack_batch,
        batch_size=docs_per_pack,
        batch_format="pyarrow",
        fn_kwargs={"seq_len": seq_len, "eos_id": int(eos)},
    )
    with user_errors("reading the training corpus"):
        ds = ds.materialize()
    if ds.count() == 0:
        raise NexusError(
            f"the corpus {paths} has fewer than {seq_len} tokens per {docs_per_pack} documents; "
            "lower --seq-len or add text"
        )
    return ds


def quiet_data_progress() -> None:
    """Training iterates the same small datasets many times; one progress bar per pass is noise."""
    ray.data.DataContext.get_current().enable_progress_bars = False


def rank_rows(ds_iterator, *, batch_size: int, rank: int, world: int, skip: int = 0, cycle: bool = True):
    """Yield this rank's micro-batches as numpy column dicts with their epoch, forever if ``cycle``.

    Global micro-batch ``g`` goes to rank ``g % world``; the first ``skip`` micro-batches of
    this rank are skipped (resume). Works on a ``DataIterator`` from ``get_dataset_shard``
    of an unsplit dataset, or on a Dataset.
    """
    seen = 0
    epoch = 0
    while True:
        mine = 0
        for g, batch in enumerate(
            ds_iterator.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True)
        ):
            if g % world != rank:
                continue
            mine += 1
            if seen >= skip:
                yield batch, epoch
            seen += 1
        if mine == 0:
            raise NexusError(
                f"the training corpus holds fewer than {batch_size * world} blocks of --seq-len tokens, too few "
                "for one micro-batch per worker; lower --batch-size, --seq-len or --workers"
            )
        if not cycle:
            return
        epoch += 1


def _ids(batch) -> torch.Tensor:
    return torch.from_numpy(np.array(batch["input_ids"], dtype=np.int64))


def rank_batches(ds_iterator, *, batch_size: int, rank: int, world: int, skip: int = 0, cycle: bool = True):
    """Yield this rank's [batch_size, seq_len] int64 micro-batches and their epoch (see :func:`rank_rows`)."""
    for batch, epoch in rank_rows(
        ds_iterator, batch_size=batch_size, rank=rank, world=world, skip=skip, cycle=cycle
    ):
        yield _ids(batch), epoch


def blocks_consumed(*, batch_size: int, grad_accum: int, workers: int, steps: int) -> int:
    """Blocks a run reads in ``steps`` optimizer steps (before it would cycle over the data)."""
    return batch_size * grad_accum * workers * steps


def block_digest(ids: np.ndarray) -> bytes:
    """16-byte BLAKE2b of one block's tokens (int32): the key that ties a teacher row to its block."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int32).tobytes(), digest_size=16).digest()


@dataclass
class TeacherRows:
    """Offline KD targets of one micro-batch (``nexus distill``): per predicted position, the
    teacher's top-k token ids and log-probabilities and the log of the mass outside them."""

    ids: torch.Tensor  # [B, S-1, k] int64
    logp: torch.Tensor  # [B, S-1, k] float32
    rest: torch.Tensor  # [B, S-1] float32

    def to(self, device) -> TeacherRows:
        return TeacherRows(self.ids.to(device), self.logp.to(device), self.rest.to(device))


def check_rows(blocks: np.ndarray, digests, where: str) -> None:
    """Refuse teacher rows whose stored token digests are not those of ``blocks`` (one per row)."""
    for i, (block, digest) in enumerate(zip(blocks, digests)):
        if block_digest(block) != bytes(digest):
            raise NexusError(
                f"the teacher row for {where} block {i} does not line up with the training block (token "
                "digests differ); the distill output was made for other data: rerun `nexus distill` with "
                "training's corpus and settings"
            )


def rank_teacher_batches(
    ds_iterator, *, batch_size: int, rank: int, world: int, skip: int = 0, cycle: bool = True
):
    """Like :func:`rank_batches` over blocks zipped with their teacher rows: yields
    ``(ids, epoch, TeacherRows)``, after checking every row's token digest against its block."""
    n = skip
    for batch, epoch in rank_rows(
        ds_iterator, batch_size=batch_size, rank=rank, world=world, skip=skip, cycle=cycle
    ):
        check_rows(batch["input_ids"], batch["digest"], f"rank {rank}'s micro-batch {n},")
        n += 1
        ids = _ids(batch)
        rows, positions = ids.shape[0], ids.shape[1] - 1
        teacher = TeacherRows(
            torch.from_numpy(_stacked(batch["top_ids"], np.int64).reshape(rows, positions, -1)),
            torch.from_numpy(_stacked(batch["top_logp"], np.float32).reshape(rows, positions, -1)),
            torch.from_numpy(_stacked(batch["rest"], np.float32).reshape(rows, positions)),
        )
        yield ids, epoch, teacher


def _stacked(column, dtype) -> np.ndarray:
    """A fixed-size list column of a numpy batch (an object array of arrays) as one 2-D array."""
    return np.stack([np.asarray(v, dtype=dtype) for v in column])
