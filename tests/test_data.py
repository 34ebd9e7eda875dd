"""The offline tiny model, the toy data and the preference data pipeline (fastpref.data).

Everything is built here from configs and generated data; nothing is downloaded
(HF_HUB_OFFLINE=1, and every path is a local folder). Sizes are tiny: the whole file runs in
seconds on two CPU cores.
"""

from __future__ import annotations

import io
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402

from fastpref import cli, data  # noqa: E402
from fastpref.data import (  # noqa: E402
    LatentCache,
    PairSampler,
    PreferenceDataset,
    cache_key,
    collate_pairs,
    encode_images,
    encode_prompts,
    pairs_to_batch,
    shared_noise_and_timesteps,
)
from fastpref.tiny_model import detect_arch  # noqa: E402
from fastpref.toy_data import encode_jpeg, make_rows, write_parquet  # noqa: E402

RES = 32
PAIRS, TIES, CORRUPT = 24, 3, 1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both tiny pipelines, written through the CLI."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for arch in ("sd15", "sdxl"):
        paths[arch] = root / arch
        assert cli.main(["make-tiny-model", str(paths[arch]), "--arch", arch, "--seed", "0"]) == 0
    return paths


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy pairs with ties and one corrupt row, written through the CLI."""
    root = tmp_path_factory.mktemp("toy")
    args = ["make-toy-data", str(root), "--pairs", str(PAIRS), "--resolution", str(RES), "--ties", str(TIES), "--corrupt", str(CORRUPT)]
    assert cli.main(args) == 0
    return root / "train.parquet"


def solid(color, size=RES) -> bytes:
    from PIL import Image

    return encode_jpeg(Image.new("RGB", (size, size), color))


# --------------------------------------------------------------------------------------------
# tiny model
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' Euler scheduler vs NumPy 2
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_model_loads_offline_and_runs(models, arch):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    path = models[arch]
    assert detect_arch(path) == arch
    expected = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    expected |= {"text_encoder_2", "tokenizer_2"} if arch == "sdxl" else set()
    assert expected <= {p.name for p in path.iterdir()}
    assert (path / "tokenizer" / "vocab.json").exists() and (path / "tokenizer" / "merges.txt").exists()
    assert list((path / "unet").glob("*.safetensors"))

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path, local_files_only=True)
    tokens = pipe.tokenizer("a red circle").input_ids
    assert len(tokens) == 5 and pipe.tokenizer.model_max_length == 77  # bos, 3 whole words, eos

    # Components load on their own too; one UNet forward with the pipeline's own conditioning.
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    embeds, pooled = encode_prompts(["a red circle", "a blue square"], tokenizers, encoders)
    assert embeds.shape == (2, 77, unet.config.cross_attention_dim)
    extra = {}
    if arch == "sdxl":
        time_ids = torch.tensor([[RES, RES, 0, 0, RES, RES]] * 2, dtype=torch.float32)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    latents = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=embeds, **extra).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()

    image = pipe("a red circle", num_inference_steps=1, height=RES, width=RES, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, RES, RES, 3)


def test_tiny_model_is_seeded(models, tmp_path):
    from safetensors.torch import load_file

    from fastpref.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again", "sd15", seed=0)
    other = make_tiny_model(tmp_path / "other", "sd15", seed=1)
    weights = lambda p: load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    first, second, third = weights(models["sd15"]), weights(again), weights(other)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)
    with pytest.raises(FileExistsError):
        make_tiny_model(again, "sd15")


# --------------------------------------------------------------------------------------------
# toy data
# --------------------------------------------------------------------------------------------


def test_toy_data_schema_and_content(toy):
    from PIL import Image

    table = pq.read_table(toy)
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(table.column_names)
    assert table.num_rows == PAIRS
    labels = table.column("label_0").to_pylist()
    assert labels.count(0.5) == TIES and {0.0, 1.0} <= set(labels) <= {0.0, 0.5, 1.0}
    bad = 0
    for row in range(PAIRS):
        for col in ("jpg_0", "jpg_1"):
            try:
                assert Image.open(io.BytesIO(table.column(col)[row].as_py())).convert("RGB").size == (RES, RES)
            except (OSError, SyntaxError):
                bad += 1
    assert bad == CORRUPT
    # Same seed, same rows; another seed, other rows.
    assert make_rows(6, seed=3) == make_rows(6, seed=3)
    assert make_rows(6, seed=3)["caption"] != make_rows(6, seed=4)["caption"]


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


def test_ties_dropped_or_kept_and_corrupt_row_counted(toy):
    dropped = PreferenceDataset(toy, RES)
    assert dropped.num_rows == PAIRS and dropped.num_undecodable == CORRUPT and dropped.num_malformed == 0
    assert dropped.num_ties == TIES and dropped.num_ties_dropped == TIES
    assert len(dropped) == PAIRS - TIES - CORRUPT
    kept = PreferenceDataset(toy, RES, keep_ties=True)
    assert len(kept) == PAIRS - CORRUPT and kept.num_ties_dropped == 0
    ties = [kept[i] for i in range(len(kept)) if kept[i]["tie"]]
    assert len(ties) == TIES and all(t["human_label"] == 0.5 for t in ties)
    for dataset in (dropped, kept):  # every served item decodes, in range and shape
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["pixel_values"].shape == (2, 3, RES, RES)
            assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
        assert set(dataset.skipped["undecodable"]).isdisjoint(dataset.rows.tolist())


def test_malformed_rows_skipped_and_counted(tmp_path):
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    columns = {
        "caption": ["ok", "bad label", None, "no image", "nan label", "garbage", "ok too"],
        "jpg_0": [red, red, red, None, red, b"not an image", blue],
        "jpg_1": [blue, blue, blue, blue, blue, blue, red],
        "label_0": [1.0, 0.3, 1.0, 0.0, float("nan"), 1.0, 0.0],
    }
    dataset = PreferenceDataset(write_parquet(columns, tmp_path / "rows.parquet"), RES)
    assert dataset.skipped == {"malformed": [1, 2, 3, 4], "undecodable": [5]}
    assert len(dataset) == 2 and dataset.rows.tolist() == [0, 6]
    with pytest.raises(ValueError, match="label_0"):
        PreferenceDataset(write_parquet({"caption": ["x"], "jpg_0": [red], "jpg_1": [blue]}, tmp_path / "x.parquet"), RES)


def test_winner_first_by_label(tmp_path):
    red, blue = solid((255, 0, 0)), solid((0, 0, 255))
    columns = {"caption": ["a", "b"], "jpg_0": [red, red], "jpg_1": [blue, blue], "label_0": [1.0, 0.0]}
    dataset = PreferenceDataset(write_parquet(columns, tmp_path / "pairs.parquet"), 16)
    redness = lambda px: (px[0] - px[2]).mean().item()  # noqa: E731 - red minus blue channel
    first, second = dataset[0]["pixel_values"], dataset[1]["pixel_values"]
    assert redness(first[0]) > 1.5 and redness(first[1]) < -1.5  # label_0 = 1: jpg_0 (red) first
    assert redness(second[0]) < -1.5 and redness(second[1]) > 1.5  # label_0 = 0: jpg_1 (blue) first
    assert torch.equal(first, second.flip(0))
    assert dataset[1]["human_label"] == 1.0 and not dataset[1]["flipped"]


def test_folder_of_parquet_files(tmp_path, toy):
    table = pq.read_table(toy)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 10), folder / "part-0.parquet")
    pq.write_table(table.slice(10), folder / "part-1.parquet")
    whole, split = PreferenceDataset(toy, RES), PreferenceDataset(folder, RES)
    assert len(split.files) == 2 and split.summary() == whole.summary()
    assert split.rows.tolist() == whole.rows.tolist()
    assert torch.equal(split[len(split) - 1]["pixel_values"], whole[len(whole) - 1]["pixel_values"])


def test_flip_rate_exact_count_seeded(toy):
    plain = PreferenceDataset(toy, RES, keep_ties=True)
    decided = sum(1 for i in range(len(plain)) if not plain[i]["tie"])
    for rate in (0.0, 0.1, 0.25, 1.0):
        flipped = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=rate, flip_seed=7)
        assert flipped.num_flipped == int(flipped.flipped.sum()) == math.floor(rate * decided + 0.5)
    a = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.25, flip_seed=7)
    b = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.25, flip_seed=7)
    c = PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.25, flip_seed=8)
    assert a.flipped_rows == b.flipped_rows and a.flipped_rows != c.flipped_rows
    for i in range(len(a)):
        item, base = a[i], plain[i]
        assert item["row"] == base["row"]
        if item["flipped"]:
            assert not item["tie"] and item["human_label"] == 0.0
            assert torch.equal(item["pixel_values"], base["pixel_values"].flip(0))
        else:
            assert torch.equal(item["pixel_values"], base["pixel_values"])
    with pytest.raises(ValueError, match="flip_rate"):
        PreferenceDataset(toy, RES, flip_rate=1.5)


def test_sampler_order_is_seeded_and_resumes():
    n = 7
    full = PairSampler(n, seed=5, infinite=True)
    stream = [i for _, i in zip(range(3 * n), full)]
    assert stream == [i for _, i in zip(range(3 * n), PairSampler(n, seed=5, infinite=True))]
    assert stream != [i for _, i in zip(range(3 * n), PairSampler(n, seed=6, infinite=True))]
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    for position in (0, 3, n, n + 4):  # resume inside and across epoch boundaries
        resumed = PairSampler(n, seed=5, start=position, infinite=True)
        assert [i for _, i in zip(range(3 * n - position), resumed)] == stream[position:]
    one_pass = PairSampler(n, seed=5, start=n + 4)
    assert list(one_pass) == stream[n + 4 : 2 * n] and len(one_pass) == n - 4
    one_pass.set_epoch(2)
    assert list(one_pass) == stream[2 * n :]
    state = PairSampler(n, seed=5, start=9).state_dict()
    restored = PairSampler(n, seed=0)
    restored.load_state_dict(state)
    assert list(restored) == stream[9 : 2 * n]


def test_dataloader_batches_resume_bitwise(toy):
    dataset = PreferenceDataset(toy, RES, flip_rate=0.2, flip_seed=1)
    loader = lambda start: torch.utils.data.DataLoader(  # noqa: E731
        dataset, batch_size=4, sampler=PairSampler(len(dataset), seed=2, start=start, infinite=True), collate_fn=collate_pairs
    )
    batches = [b for _, b in zip(range(6), loader(0))]
    assert batches[0]["pixel_values"].shape == (4, 2, 3, RES, RES)
    assert batches[0]["flipped"].dtype == torch.bool and batches[0]["index"].dtype == torch.int64
    assert isinstance(batches[0]["captions"], list) and len(batches[0]["captions"]) == 4
    resumed = [b for _, b in zip(range(3), loader(3 * 4))]
    for ours, theirs in zip(resumed, batches[3:]):
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        assert torch.equal(ours["index"], theirs["index"]) and ours["captions"] == theirs["captions"]


def test_pair_layout_and_shared_noise():
    pairs = torch.arange(3 * 2 * 5, dtype=torch.float32).reshape(3, 2, 5)
    batch = pairs_to_batch(pairs)
    assert torch.equal(batch[:3], pairs[:, 0]) and torch.equal(batch[3:], pairs[:, 1])
    noise, timesteps = shared_noise_and_timesteps(batch, 1000, torch.Generator().manual_seed(0))
    assert noise.shape == batch.shape and torch.equal(noise[:3], noise[3:])
    assert timesteps.shape == (6,) and torch.equal(timesteps[:3], timesteps[3:])


# --------------------------------------------------------------------------------------------
# latent cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders(models):
    return {arch: data.load_encoders(models[arch]) for arch in models}


def counted(vae):
    calls = []
    original = vae.encode

    def encode(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    vae.encode = encode
    return calls


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_latent_cache_hit_reuses_and_matches(models, encoders, toy, tmp_path, monkeypatch, arch):
    vae, tokenizers, text_encoders = encoders[arch]
    calls = counted(vae)
    dataset = PreferenceDataset(toy, RES, flip_rate=0.25, flip_seed=3)
    kwargs = dict(vae=vae, tokenizers=tokenizers, text_encoders=text_encoders, batch_size=4, shard_size=8)
    first = LatentCache.build(dataset, tmp_path, models[arch], **kwargs)
    assert not first.hit and calls and first.path.parent == tmp_path
    assert len(first) == PAIRS - CORRUPT and first.latents.shape[1:] == (2, 4, RES // 8, RES // 8)
    assert len(list(first.path.glob("latents-*.safetensors"))) == math.ceil(PAIRS / 8)

    n_calls = len(calls)
    second = LatentCache.build(dataset, tmp_path, models[arch], **kwargs)
    assert second.hit and len(calls) == n_calls  # no VAE call on a hit
    assert second.key == first.key and torch.equal(second.latents, first.latents)
    assert torch.equal(second.prompt_embeds, first.prompt_embeds)
    # A hit never loads the models either.
    monkeypatch.setattr(data, "load_encoders", lambda *a, **k: pytest.fail("models loaded on a cache hit"))
    assert LatentCache.build(dataset, tmp_path, models[arch]).hit

    # The view serves what the pixel path encodes: winner first, flips applied, same captions.
    view = second.view(dataset)
    assert len(view) == len(dataset)
    for i in (0, 3, len(dataset) - 1):
        item, pixels = view[i], dataset[i]
        assert item["row"] == pixels["row"] and item["flipped"] == pixels["flipped"]
        torch.testing.assert_close(item["latents"], encode_images(vae, pixels["pixel_values"]), atol=1e-5, rtol=1e-5)
        embeds, pooled = encode_prompts([pixels["caption"]], tokenizers, text_encoders)
        torch.testing.assert_close(item["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
        if arch == "sdxl":
            torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[0], atol=1e-5, rtol=1e-5)
        else:
            assert "pooled_prompt_embeds" not in item
    batch = collate_pairs([view[i] for i in range(4)])
    assert batch["latents"].shape == (4, 2, 4, RES // 8, RES // 8) and batch["prompt_embeds"].shape[:2] == (4, 77)

    # A dataset that did not decode its images up front learns the undecodable row from the cache.
    unchecked = PreferenceDataset(toy, RES, flip_rate=0.25, flip_seed=3, check_images=False)
    assert unchecked.num_undecodable == 0 and len(unchecked) == len(dataset) + 1
    lazy_view = second.view(unchecked)
    assert lazy_view.dataset.num_undecodable == CORRUPT and len(lazy_view) == len(view)
    assert lazy_view.dataset.flipped_rows == dataset.flipped_rows
    assert torch.equal(lazy_view[5]["latents"], view[5]["latents"])


def test_cache_key_depends_on_dataset_model_and_resolution(models, toy, tmp_path):
    base = PreferenceDataset(toy, RES)
    key = cache_key(base, models["sd15"])[0]
    assert cache_key(PreferenceDataset(toy, RES), models["sd15"])[0] == key
    # Ties, flips and truncation apply on top of the cache: same key.
    assert cache_key(PreferenceDataset(toy, RES, keep_ties=True, flip_rate=0.5, max_pairs=3), models["sd15"])[0] == key
    assert cache_key(PreferenceDataset(toy, 2 * RES), models["sd15"])[0] != key
    assert cache_key(base, models["sdxl"])[0] != key
    assert cache_key(base, models["sd15"], dtype=torch.float16)[0] != key
    other = write_parquet(make_rows(PAIRS, resolution=RES, seed=1), tmp_path / "other.parquet")
    assert cache_key(PreferenceDataset(other, RES), models["sd15"])[0] != key
