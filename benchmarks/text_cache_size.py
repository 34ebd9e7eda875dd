"""Disk size of the latent cache's text embeddings per 1,000 distinct captions, for each model
family and T5 ``--max_sequence_length``: ``python benchmarks/text_cache_size.py``.

Computed from the real models' published dimensions (below, from their ``config.json`` files),
not measured: the cache stores, per distinct caption and in float32, what the family's
``encode_prompts`` returns (``fastpref.train.families``), and per pair the two images' latents.
A safetensors shard adds a header of a few hundred bytes per file, nothing per caption.
"""

from __future__ import annotations

import argparse

FLOAT32 = 4  # bytes: the cache stores float32 (fastpref.train.latent_cache)
CLIP_LENGTH = 77
# Published widths: CLIP ViT-L/14 text (hidden 768, projection 768), OpenCLIP ViT-bigG/14 text
# (hidden 1280, projection 1280), T5 v1.1 XXL encoder (d_model 4096).
CLIP_L, CLIP_G, T5_XXL = 768, 1280, 4096
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16}


# The float32 values the cache holds per distinct caption, by family, for ``max_sequence_length`` L.
FLOATS_PER_CAPTION = {
    "sd15": lambda L: CLIP_LENGTH * CLIP_L,  # prompt_embeds [77, 768]
    "sdxl": lambda L: CLIP_LENGTH * (CLIP_L + CLIP_G) + CLIP_G,  # prompt_embeds [77, 768 + 1280], pooled [1280]
    # T5 [L, 4096], both CLIPs' hidden states [77, 2048], pooled [2048]
    "sd3": lambda L: L * T5_XXL + CLIP_LENGTH * (CLIP_L + CLIP_G) + CLIP_L + CLIP_G,
    "flux": lambda L: L * T5_XXL + CLIP_L,  # T5 [L, 4096], CLIP-L pooled [768]
}


def floats_per_caption(family: str, max_sequence_length: int) -> int:
    """The float32 values the cache holds per distinct caption."""
    return FLOATS_PER_CAPTION[family](max_sequence_length)


def latent_bytes_per_pair(family: str, resolution: int) -> int:
    """Both images' latents ``[2, C, R/8, R/8]`` float32."""
    side = resolution // 8
    return 2 * LATENT_CHANNELS[family] * side * side * FLOAT32


def rows(lengths=(77, 128, 256, 512)):
    out = [("sd15", "-", floats_per_caption("sd15", 0)), ("sdxl", "-", floats_per_caption("sdxl", 0))]
    out += [(family, length, floats_per_caption(family, length)) for family in ("sd3", "flux") for length in lengths]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024, help="image side for the latents' row (pixels)")
    args = parser.parse_args(argv)
    print("| family | --max_sequence_length | text embeddings per 1k captions | latents per 1k pairs |")
    print("|---|---|---|---|")
    for family, length, floats in rows():
        text_gb = 1000 * floats * FLOAT32 / 1e9
        latents_gb = 1000 * latent_bytes_per_pair(family, args.resolution) / 1e9
        print(f"| {family} | {length} | {text_gb:.2f} GB | {latents_gb:.2f} GB at {args.resolution} px |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
