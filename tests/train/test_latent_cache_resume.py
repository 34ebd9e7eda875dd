"""The latent cache at scale (``fastpref.train.latent_cache``): an interrupted build resumes
where it stopped, a truncated or mismatched shard is rebuilt (never served), NaN latents are
refused with the row named, Hub ids and data sets of equal size key the cache apart, and shards
are read memory-mapped."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from offline import CORRUPT, PAIRS, RES  # noqa: E402

from fastpref.train.data import PreferenceDataset  # noqa: E402
from fastpref.train.families import FAMILIES  # noqa: E402
from fastpref.train.latent_cache import CacheFileError, LatentCache, building, cache_key, read_tensors  # noqa: E402
from fastpref.train.models import ModelSource  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")
SHARD = 6  # 24 rows: 4 latent shards


@pytest.fixture(scope="module")
def sd15(models):
    return models["sd15"], FAMILIES["sd15"].load_encoders(ModelSource(str(models["sd15"])))


def build(dataset, folder, sd15, **kwargs):
    path, (vae, tokenizers, text_encoders) = sd15
    return LatentCache.build(
        dataset,
        folder,
        path,
        vae=vae,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        batch_size=4,
        shard_size=SHARD,
        progress=False,
        **kwargs,
    )


def contents(cache):
    """Every cached pair and unique caption's embeddings, read through ``pair`` and ``text``."""
    pairs = [cache.pair(position)["latents"] for position in range(len(cache))]
    texts = [cache.text(index)["prompt_embeds"] for index in range(cache.meta["num_captions"])]
    return torch.stack(pairs), torch.stack(texts)


def same_contents(cache, other) -> bool:
    return all(torch.equal(mine, theirs) for mine, theirs in zip(contents(cache), contents(other)))


@pytest.fixture(scope="module")
def reference(toy, sd15, tmp_path_factory):
    """A cache built in one go."""
    dataset = PreferenceDataset(toy, RES, check_images=False)
    return dataset, build(dataset, tmp_path_factory.mktemp("reference"), sd15)


def test_an_interrupted_build_resumes_where_it_stopped(reference, sd15, tmp_path, monkeypatch):
    dataset, whole = reference
    encoded = []
    original = building._encode_rows

    def interrupted(dataset_, rows, *args):
        if len(encoded) == 2:
            raise KeyboardInterrupt  # stands for a kill between two shards
        encoded.append(rows.tolist())
        return original(dataset_, rows, *args)

    monkeypatch.setattr(building, "_encode_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(dataset, tmp_path, sd15)
    folder = tmp_path / whole.key
    assert not (folder / "meta.json").exists() and len(list(folder.glob("latents-*.safetensors"))) == 2

    def resumed(dataset_, rows, *args):
        encoded.append(rows.tolist())
        return original(dataset_, rows, *args)

    monkeypatch.setattr(building, "_encode_rows", resumed)
    cache = build(dataset, tmp_path, sd15)
    assert not cache.hit and len(encoded) == PAIRS // SHARD  # the two shards left, none twice
    assert sorted(sum(encoded, [])) == list(range(PAIRS))
    assert same_contents(cache, whole) and cache.undecodable_rows == whole.undecodable_rows
    assert build(dataset, tmp_path, sd15).hit


def test_a_truncated_or_mismatched_shard_is_rebuilt(reference, sd15, tmp_path, caplog):
    dataset, whole = reference
    build(dataset, tmp_path, sd15)
    folder = tmp_path / whole.key
    torn = folder / "latents-00001.safetensors"
    torn.write_bytes(torn.read_bytes()[:-100])
    with pytest.raises(CacheFileError, match="truncated or torn"):
        LatentCache.open(folder)
    with caplog.at_level(logging.WARNING, logger="fastpref.train.latent_cache"):
        rebuilt = build(dataset, tmp_path, sd15)
    assert not rebuilt.hit and str(torn) in caplog.text
    assert same_contents(rebuilt, whole)
    # A shard of other rows (copied from elsewhere) is a mismatch: rebuilt too.
    (folder / "latents-00002.safetensors").write_bytes((folder / "latents-00000.safetensors").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastpref.train.latent_cache"):
        again = build(dataset, tmp_path, sd15)
    assert not again.hit and "holds other rows" in caplog.text and same_contents(again, whole)


def test_nan_latents_are_refused_with_the_row_named(toy, sd15, tmp_path, monkeypatch):
    """The VAE overflows (as an fp16 SDXL VAE does) on one row's images: that row is named."""
    from PIL import Image

    from fastpref.testing.toy_data import encode_jpeg

    dataset = PreferenceDataset(toy, RES, check_images=False)
    victim = int(dataset.rows[7])
    white = encode_jpeg(Image.new("RGB", (RES, RES), (255, 255, 255)))  # no toy image is all white
    real = dataset.image_data
    monkeypatch.setattr(dataset, "image_data", lambda row, which: white if row == victim else real(row, which))
    original = FAMILIES["sd15"].encode_images

    def overflowing(vae, pixels, batch_size=None):
        out = original(vae, pixels, batch_size)
        out[(pixels.flatten(1) == 1).all(dim=1)] = float("nan")
        return out

    monkeypatch.setattr(FAMILIES["sd15"], "encode_images", overflowing)
    with pytest.raises(ValueError, match=rf"row\(s\) \[{victim}\] hold NaN or Inf.*pretrained_vae_model_name_or_path"):
        build(dataset, tmp_path, sd15)
    assert not list(tmp_path.glob("*/meta.json"))


def test_hub_ids_key_the_cache_by_revision_variant_and_vae(toy, models):
    dataset = PreferenceDataset(toy, RES, check_images=False)
    key = cache_key(dataset, ModelSource("org/pipeline"))[0]
    assert cache_key(dataset, "org/pipeline")[0] == key  # a bare id is its ModelSource
    assert cache_key(dataset, ModelSource("org/pipeline", revision="main"))[0] == key  # no revision is main
    others = [
        cache_key(dataset, ModelSource("org/pipeline", revision="abc123"))[0],
        cache_key(dataset, ModelSource("org/pipeline", variant="fp16"))[0],
        cache_key(dataset, ModelSource("org/pipeline", vae_path="madebyollin/sdxl-vae-fp16-fix"))[0],
        cache_key(dataset, ModelSource("org/other"))[0],
        cache_key(dataset, ModelSource(str(models["sd15"]), vae_path=str(models["sd15"] / "vae")))[0],
    ]
    assert len({key, *others}) == 6
    assert cache_key(dataset, models["sd15"])[0] not in others


def test_data_sets_of_equal_size_never_share_a_key(toy, tmp_path):
    """Files of equal size but other rows, and passed-in data sets that select or reorder the
    same file's rows (a selection ``datasets`` keeps private), each get their own key."""
    from fastpref.testing.toy_data import make_rows, write_parquet

    source = ModelSource("org/pipeline")
    whole = PreferenceDataset(toy, RES, check_images=False)
    other = write_parquet(make_rows(PAIRS, resolution=RES, seed=1), tmp_path / "other.parquet")
    keys = [cache_key(whole, source)[0], cache_key(PreferenceDataset(other, RES, check_images=False), source)[0]]
    half = PAIRS // 2
    for selected in (range(half), range(half, PAIRS), [*range(half, PAIRS), *range(half)]):
        passed = PreferenceDataset(whole.data.select(selected), RES, check_images=False)
        keys.append(cache_key(passed, source)[0])
    assert len(set(keys)) == len(keys)
    assert cache_key(PreferenceDataset(whole.data.select(range(half)), RES), source)[0] == keys[2]  # content


def test_items_are_read_memory_mapped(reference):
    dataset, cache = reference
    tensors = read_tensors(cache.path / cache.meta["shards"][0])
    assert isinstance(tensors["latents"].base, np.memmap) or isinstance(tensors["latents"], np.memmap)
    view = cache.view(dataset)
    assert len(view) == len(dataset) - CORRUPT
    item = view[(3, 99)]  # a sampler key with a position: no augmentation on latents
    assert item["latents"].shape == (2, 4, RES // 8, RES // 8) and item["skipped_rows"] == []
    assert torch.equal(item["latents"], view[3]["latents"])


def test_two_processes_split_the_encoding(reference, sd15, tmp_path, monkeypatch):
    """Two ranks (threads standing for processes, a barrier for ``wait_for_everyone``) encode the
    even and the odd shards, each once, and open the same cache as a one-process build."""
    import threading

    dataset, whole = reference
    barrier = threading.Barrier(2, timeout=300)
    encoded = {0: [], 1: []}
    original = building._encode_rows
    rank_of = threading.local()

    def counting(dataset_, rows, *args):
        encoded[rank_of.rank].append(int(rows[0]))
        return original(dataset_, rows, *args)

    monkeypatch.setattr(building, "_encode_rows", counting)

    class Rank:
        num_processes = 2

        def __init__(self, rank):
            self.process_index, self.is_local_main_process = rank, rank == 0

        def wait_for_everyone(self):
            barrier.wait()

    caches = {}

    def run(rank):
        rank_of.rank = rank
        caches[rank] = build(dataset, tmp_path, sd15, accelerator=Rank(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert encoded == {0: [0, 2 * SHARD], 1: [SHARD, 3 * SHARD]}  # the first row of each shard
    for cache in caches.values():
        assert same_contents(cache, whole)
