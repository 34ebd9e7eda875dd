"""``fastpref train --streaming`` (issue 23, item 4): the stream's seeded order, its split across
processes, its skipped rows, its exact resume, and a streamed run killed and resumed bitwise,
over a local webdataset folder and a folder in the Hub's parquet layout."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from fastpref.testing import toy_data
from fastpref.train import checkpoints as ckpt
from fastpref.train.data import PairStream
from fastpref.train.data.dataset import UndecodableDataError

PAIRS, TIES, CORRUPT, RES = 12, 1, 1, 32
USABLE = PAIRS - TIES - CORRUPT


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 12 toy rows (1 tie, 1 undecodable) as 2 webdataset shards and as 2 parquet
    files in the Hub's layout: the same files order, so the same stream."""
    root = tmp_path_factory.mktemp("streams")
    columns = toy_data.make_rows(PAIRS, resolution=RES, seed=3, ties=TIES, corrupt=CORRUPT)
    return {
        "webdataset": toy_data.write_webdataset(columns, root / "wds", shards=2),
        "hub": toy_data.write_hub_layout({"train": columns}, root / "hub", files_per_split=2),
    }


def stream(source, **kwargs):
    return PairStream(source, RES, **{"buffer_size": 5, "batch_size": 2, "seed": 0, **kwargs})


def rows_of(batches):
    return [row for batch in batches for row in batch["captions"]]


@pytest.mark.parametrize("kind", ["webdataset", "hub"])
def test_a_stream_resumes_exactly_from_its_state(sources, kind):
    """Stopped mid-block (and later across an epoch), a new stream loaded with the state serves
    bitwise the pairs the uninterrupted one serves; one epoch serves every usable pair once,
    with the tie dropped and the undecodable row skipped and counted."""
    whole = stream(sources[kind])
    batches = [whole.next_batch() for _ in range(8)]  # 16 pairs: into the second epoch
    assert sorted(rows_of(batches[: USABLE // 2])) == sorted(set(rows_of(batches[: USABLE // 2])))
    assert whole.summary()["undecodable"] >= 1 and whole.summary()["ties_dropped"] >= 1
    for cut in (3, 6):
        first = stream(sources[kind])
        for _ in range(cut):
            first.next_batch()
        resumed = stream(sources[kind])
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for expected in batches[cut:]:
            got = resumed.next_batch()
            assert got["captions"] == expected["captions"]
            assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert resumed.summary() == whole.summary()


def test_the_order_is_seeded(sources):
    def order(seed):
        return rows_of(stream(sources["webdataset"], seed=seed).next_batch() for _ in range(USABLE // 2))

    assert order(0) == order(0)
    assert order(0) != order(1)


@pytest.mark.parametrize("kind", ["webdataset", "hub"])
@pytest.mark.parametrize("world, pairs", [(2, 3), (3, 2)])
def test_processes_read_disjoint_rows(sources, kind, world, pairs):
    """2 processes read one file each, 3 processes every third row: disjoint rows."""
    served = []
    for rank in range(world):
        part = stream(sources[kind], rank=rank, world_size=world, batch_size=1)
        served += rows_of(part.next_batch() for _ in range(pairs))
    assert len(set(served)) == len(served) == world * pairs


def test_both_layouts_stream_the_same_pairs(sources):
    def first(kind):
        return stream(sources[kind]).next_batch()

    webdataset, hub = first("webdataset"), first("hub")
    assert webdataset["captions"] == hub["captions"]
    assert torch.equal(webdataset["pixel_values"], hub["pixel_values"])


def test_a_stream_with_no_usable_pair_says_so(tmp_path):
    columns = toy_data.make_rows(2, resolution=RES, corrupt=2)
    folder = toy_data.write_webdataset(columns, tmp_path / "bad")
    with pytest.raises(UndecodableDataError, match="no usable pair in a whole pass over the stream.*2 undecodable"):
        stream(folder).next_batch()


def test_a_missing_column_names_its_flag(sources):
    with pytest.raises(ValueError, match="--caption_column: the dataset has no column 'prompt'"):
        stream(sources["webdataset"], caption_column="prompt")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cache_latents"], "--cache_latents: not with --streaming"),
        (["--flip_rate", "0.1"], "--flip_rate: not with --streaming"),
        (["--max_train_samples", "4"], "--max_train_samples: not with --streaming"),
        (["--loss_type", "dedpo", "--human_fraction", "0.5"], "--loss_type dedpo: not with --streaming"),
        (["--max_train_steps", None], "--max_train_steps: --streaming needs it"),
        (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size must be >= 1"),
    ],
)
def test_flags_streaming_cannot_serve_are_refused(train_main, sources, tmp_path, extra, message):
    args = ["--streaming", "--dataset_name", str(sources["webdataset"]), "--max_train_steps", "2", *extra]
    if None in args:  # drop the flag and its value
        at = args.index(None)
        args = args[: at - 1] + args[at + 1 :]
        args = args[: args.index("--max_train_steps")] + args[args.index("--max_train_steps") + 2 :]
    code, err = train_main(tmp_path / "out", *args)
    assert code == 2 and message in err


def test_a_source_streaming_cannot_read_is_refused_up_front(train_main, tiny_run, tmp_path):
    """A ``save_to_disk`` folder (memory-mapped already) and a folder with no tar or parquet file."""
    saved = toy_data.write_saved_dataset(toy_data.make_rows(2, resolution=RES), tmp_path / "saved")
    (tmp_path / "empty").mkdir()
    for folder, message in ((saved, "is a save_to_disk folder"), (tmp_path / "empty", "no *.tar or *.parquet")):
        code, err = train_main(tmp_path / "out", "--streaming", "--dataset_name", str(folder), "--max_train_steps", "1")
        assert code == 2 and message in err


def test_streaming_and_its_buffer_cannot_change_on_resume():
    from fastpref.train.checks import RESUME_CHANGEABLE

    assert not {"streaming", "shuffle_buffer_size"} & RESUME_CHANGEABLE


def test_the_buffer_size_needs_streaming(train_main, tmp_path):
    code, err = train_main(tmp_path / "out", "--shuffle_buffer_size", "10")
    assert code == 2 and "--shuffle_buffer_size: only with --streaming" in err


STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--shuffle_buffer_size", "2"]


def weights(out):
    from safetensors.torch import load_file

    return load_file(out / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_run, sources, tmp_path_factory):
    """The uninterrupted streamed run (the same for both layouts: the same stream)."""
    from offline import tiny_args

    from fastpref.train.cli import main

    out = tmp_path_factory.mktemp("streamed") / "reference"
    assert main(tiny_args(tiny_run, out, "--streaming", "--dataset_name", str(sources["hub"]), *STEPS)) == 0
    return out


class Killed(Exception):
    """Stands for the SIGKILL of the fault hook (``FASTPREF_FAULT``), raised at the same point in
    this process: a subprocess would cost a start-up of its own."""


@pytest.mark.parametrize("kind", ["webdataset", "hub"])
def test_a_streamed_run_killed_and_resumed_is_bitwise(
    tiny_run, sources, reference, train_subprocess, tmp_path, monkeypatch, kind
):
    """2 steps of 2 pairs in blocks of 2 rows, killed at the fault hook once ``checkpoint-1`` is
    saved (mid-way through the second block, the undecodable row passed), resumed with
    ``latest``: bitwise the weights and log of the uninterrupted run (over the Hub-layout folder:
    both layouts are the same stream), the undecodable row counted once. Over tar shards the
    kill is a real SIGKILL of a ``fastpref train`` process; over parquet, the hook raises in this
    process (a second start-up saved)."""
    from offline import tiny_args

    from fastpref.train.cli import main

    def fault(point, step):
        if (point, step) == ("saved", 1):
            raise Killed

    flags = ["--streaming", "--dataset_name", str(sources[kind]), *STEPS]
    out = tmp_path / "out"
    if kind == "webdataset":
        result = train_subprocess(out, *flags, fault="saved:1", check=False)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    else:
        with monkeypatch.context() as patch:
            patch.setattr(ckpt, "fault", fault)
            with pytest.raises(Killed):
                main(tiny_args(tiny_run, out, *flags))
    state = json.loads((out / "checkpoint-1" / "stream_state_0.json").read_text())
    assert (state["served"], state["block"], state["offset"], state["counts"]["undecodable"]) == (2, 1, 1, 1)
    assert state["block_start"] is not None  # resumed from the datasets stream's own state
    assert main(tiny_args(tiny_run, out, *flags, "--resume_from_checkpoint", "latest")) == 0
    expected, got = weights(reference), weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert (out / "train_log.jsonl").read_text() == (reference / "train_log.jsonl").read_text()
    summaries = [json.loads((folder / "train_summary.json").read_text())["data"] for folder in (out, reference)]
    assert summaries[0]["streaming"] and summaries[0]["pairs"] == 4 and summaries[0]["undecodable_at_fetch"] == 1
    assert {k: v for k, v in summaries[0].items() if k != "dataset"} == {
        k: v for k, v in summaries[1].items() if k != "dataset"
    }


@pytest.mark.parametrize("kind", ["webdataset", "hub"])
def test_a_hub_id_streams_the_files_its_builder_lists(sources, monkeypatch, kind):
    """A Hub id is opened with ``datasets.load_dataset_builder`` (its data files listed, then
    streamed): here an id that the builder resolves to the local folder, for want of the Hub."""
    import datasets

    load = datasets.load_dataset_builder
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda name, **kw: load(str(sources[kind]), **kw))
    assert stream("org/pickapic-mirror").next_batch()["captions"] == stream(sources[kind]).next_batch()["captions"]
    with pytest.raises(ValueError, match="--dataset_split_name: org/pickapic-mirror has no split 'test'"):
        stream("org/pickapic-mirror", split="test")
