"""The toy preference world of ``fastpref demo``: 54 colour x position prompts, 8x8 coloured-square
images used directly as diffusion latents, a closed-form reward, a tiny base UNet pretrained on a
distribution that only partly matches the prompts, preference pairs of its DDIM samples and the
evaluation (the pairs' other labels are in :mod:`fastpref.demo.labels`). Everything is
deterministic for :attr:`WorldConfig.seed` and cached by :func:`load_or_build`; docs/demo.md
describes the world in full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..files import write_atomic, write_json_atomic

FORMAT_VERSION = 2
# Hexagon order: colour i and i +- 1 (mod 6) differ in exactly one channel.
COLOURS: Tuple[Tuple[str, Tuple[float, float, float]], ...] = (
    ("red", (1.0, 0.0, 0.0)),
    ("yellow", (1.0, 1.0, 0.0)),
    ("green", (0.0, 1.0, 0.0)),
    ("cyan", (0.0, 1.0, 1.0)),
    ("blue", (0.0, 0.0, 1.0)),
    ("magenta", (1.0, 0.0, 1.0)),
)
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
NUM_COLOURS = len(COLOURS)
NUM_POSITIONS = len(ROWS) * len(COLUMNS)
NUM_PROMPTS = NUM_COLOURS * NUM_POSITIONS
TOKENS = 2  # colour token, position token
BASE_KINDS = ("exact", "wrong_colour", "shifted", "faded")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """The parameters of a world; every derived object (base model, pairs) is a function of them.

    Attributes:
        seed: the world's seed (embeddings, held-out split, base data, model init, pair noise).
        image_size, blob_size: image side and square side in pixels (the square's top-left
            corner is on a 3 x 3 grid with step ``(image_size - blob_size) // 2``).
        embed_dim: width of the prompt tokens (the UNet's ``cross_attention_dim``).
        base_mix: probabilities of the base distribution's kinds (:data:`BASE_KINDS`): the
            exact prompt, a neighbouring colour, a shifted square, a faded square.
        faded_range: brightness of a faded square, uniform in this range.
        pixel_noise: std of Gaussian noise added to every base image (in [0, 1] units).
        unet_channels: ``block_out_channels`` of the tiny UNet (cross-attention at the lower level).
        pretrain_steps, pretrain_batch, pretrain_lr: the base model's denoising pretraining
            (AdamW, constant LR after a 5 % warm-up).
        pretrain_ema: EMA decay of the weights during pretraining (with diffusers' warm-up
            ``min(decay, (1 + n) / (10 + n))``); the base model is the EMA.
        num_pairs: preference pairs sampled from the base model (over the training prompts).
        sample_steps: DDIM steps for pair sampling and evaluation.
        eval_samples: DDIM samples per held-out prompt at evaluation.
    """

    seed: int = 0
    image_size: int = 8
    blob_size: int = 4
    embed_dim: int = 32
    base_mix: Tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)
    faded_range: Tuple[float, float] = (0.35, 0.65)
    pixel_noise: float = 0.03
    unet_channels: Tuple[int, int] = (16, 32)
    pretrain_steps: int = 500
    pretrain_batch: int = 64
    pretrain_lr: float = 5e-3
    pretrain_ema: float = 0.99
    num_pairs: int = 1024
    sample_steps: int = 10
    eval_samples: int = 16

    def __post_init__(self):
        if self.image_size < self.blob_size + 2 or (self.image_size - self.blob_size) % 2:
            raise ValueError(
                f"image_size - blob_size must be even and >= 2, got {self.image_size} and {self.blob_size}"
            )
        if len(self.base_mix) != len(BASE_KINDS) or abs(sum(self.base_mix) - 1.0) > 1e-6 or min(self.base_mix) < 0:
            raise ValueError(f"base_mix must be {len(BASE_KINDS)} probabilities summing to 1, got {self.base_mix}")
        for name in ("pretrain_steps", "pretrain_batch", "num_pairs", "sample_steps", "eval_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash of the parameters (and :data:`FORMAT_VERSION`): the cache folder's name."""
        text = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# prompts, templates, reward
# ----------------------------------------------------------------------------------------------


def colour_names() -> List[str]:
    return [name for name, _ in COLOURS]


def prompt_colour(prompt_ids: torch.Tensor) -> torch.Tensor:
    """Colour index (int64, ``[N]``) of prompt ids ``[N]`` (prompt = colour * 9 + position)."""
    return torch.as_tensor(prompt_ids) // NUM_POSITIONS


def prompt_position(prompt_ids: torch.Tensor) -> torch.Tensor:
    """Position index (int64, ``[N]``, row-major over the 3 x 3 grid) of prompt ids ``[N]``."""
    return torch.as_tensor(prompt_ids) % NUM_POSITIONS


def prompt_text(prompt_id: int) -> str:
    """E.g. ``"red square, top left"``."""
    color, position = divmod(int(prompt_id), NUM_POSITIONS)
    row, column = divmod(position, len(COLUMNS))
    return f"{COLOURS[color][0]} square, {ROWS[row]} {COLUMNS[column]}"


def corner(position: torch.Tensor, config: WorldConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-left pixel (row, column), int64 ``[N]`` each, of grid positions ``[N]``."""
    step = (config.image_size - config.blob_size) // 2
    position = torch.as_tensor(position)
    return (position // len(COLUMNS)) * step, (position % len(COLUMNS)) * step


def square_masks(top: torch.Tensor, left: torch.Tensor, config: WorldConfig) -> torch.Tensor:
    """Float32 ``[N, H, W]`` masks, 1 on the ``blob_size`` square with top-left ``(top, left)`` (``[N]`` each)."""
    index = torch.arange(config.image_size)
    rows = (index[None, :] >= top[:, None]) & (index[None, :] < top[:, None] + config.blob_size)
    cols = (index[None, :] >= left[:, None]) & (index[None, :] < left[:, None] + config.blob_size)
    return (rows[:, :, None] & cols[:, None, :]).to(torch.float32)


def colour_table() -> torch.Tensor:
    """Float32 ``[6, 3]``: the colours in [0, 1]."""
    return torch.tensor([rgb for _, rgb in COLOURS], dtype=torch.float32)


def templates(prompt_ids: torch.Tensor, config: WorldConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """The prompts' exact images in [0, 1] (float32 ``[N, 3, H, W]``) and their square masks ``[N, H, W]``."""
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    top, left = corner(prompt_position(prompt_ids), config)
    mask = square_masks(top, left, config)
    color = colour_table()[prompt_colour(prompt_ids)]
    return mask[:, None] * color[:, :, None, None], mask


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1], clipped (float32, same shape)."""
    return ((images.to(torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)


def reward(images: torch.Tensor, prompt_ids: torch.Tensor, config: WorldConfig) -> torch.Tensor:
    """The closed-form reward, float32 ``[N]`` in [0, 1], of images ``[N, 3, H, W]`` (in [-1, 1])
    for prompts ``[N]``: ``1 - (E_in + E_out) / 2``, E the mean over pixels of the largest
    per-channel absolute difference between the image (mapped to [0, 1], clipped) and the
    prompt's template (its square in its colour on black), inside the template's square (E_in)
    and outside it (E_out). The template scores 1; a neighbouring colour 0.5, a square shifted
    by one pixel 0.83, half brightness 0.75, a black image 0.5."""
    target, mask = templates(prompt_ids, config)
    err = (to_unit(images) - target).abs().amax(dim=1)  # [N, H, W]
    e_in = (err * mask).sum((1, 2)) / mask.sum((1, 2))
    e_out = (err * (1 - mask)).sum((1, 2)) / (1 - mask).sum((1, 2))
    return 1.0 - 0.5 * (e_in + e_out)


# ----------------------------------------------------------------------------------------------
# prompt split, embeddings
# ----------------------------------------------------------------------------------------------


def split_prompts(config: WorldConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids, held_out_ids)``, sorted int64 tensors. One prompt per position is held out,
    its colour from a seeded shuffle of the colours repeated (so each colour is held out once or
    twice, and every colour and every position keeps training prompts)."""
    rng = np.random.default_rng([config.seed, 0x5E1D])
    colors = np.concatenate([rng.permutation(NUM_COLOURS), rng.permutation(NUM_COLOURS)])[:NUM_POSITIONS]
    held = sorted(int(c) * NUM_POSITIONS + p for p, c in enumerate(colors))
    train = [i for i in range(NUM_PROMPTS) if i not in held]
    return torch.tensor(train, dtype=torch.int64), torch.tensor(held, dtype=torch.int64)


def embedding_table(config: WorldConfig) -> torch.Tensor:
    """Float32 ``[NUM_PROMPTS, 2, embed_dim]``: each prompt's (colour token, position token),
    standard normal entries drawn from the seed (one vector per colour, one per position)."""
    gen = torch.Generator().manual_seed(config.seed * 1000003 + 17)
    color_tokens = torch.randn(NUM_COLOURS, config.embed_dim, generator=gen)
    position_tokens = torch.randn(NUM_POSITIONS, config.embed_dim, generator=gen)
    ids = torch.arange(NUM_PROMPTS)
    return torch.stack([color_tokens[prompt_colour(ids)], position_tokens[prompt_position(ids)]], dim=1)


# ----------------------------------------------------------------------------------------------
# the base distribution
# ----------------------------------------------------------------------------------------------


def _shift_table(config: WorldConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each grid position, the corners of squares shifted by 1 or 2 pixels (Chebyshev
    distance) that stay inside the image: ``tops [9, M]``, ``lefts [9, M]`` (padded), ``counts [9]``."""
    limit = config.image_size - config.blob_size
    top, left = corner(torch.arange(NUM_POSITIONS), config)
    options = []
    for row, column in zip(top.tolist(), left.tolist()):
        here = [
            (row + dr, column + dc)
            for dr in range(-2, 3)
            for dc in range(-2, 3)
            if (dr, dc) != (0, 0) and 0 <= row + dr <= limit and 0 <= column + dc <= limit
        ]
        options.append(here)
    width = max(len(o) for o in options)
    tops = torch.zeros(NUM_POSITIONS, width, dtype=torch.int64)
    lefts = torch.zeros(NUM_POSITIONS, width, dtype=torch.int64)
    for i, here in enumerate(options):
        tops[i, : len(here)] = torch.tensor([row for row, _ in here])
        lefts[i, : len(here)] = torch.tensor([column for _, column in here])
    return tops, lefts, torch.tensor([len(o) for o in options])


def draw_base_images(
    prompt_ids: torch.Tensor, config: WorldConfig, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Samples of the base distribution for prompts ``[N]`` (int64): images float32
    ``[N, 3, H, W]`` in [-1, 1] (plus noise) and their kind (int64 ``[N]``, index into
    :data:`BASE_KINDS`). Deterministic for the generator's state."""
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    n = prompt_ids.shape[0]
    kind = torch.multinomial(
        torch.tensor(config.base_mix, dtype=torch.float64), n, replacement=True, generator=generator
    )
    color = prompt_colour(prompt_ids).clone()
    position = prompt_position(prompt_ids)
    top, left = corner(position, config)

    step = torch.randint(0, 2, (n,), generator=generator) * 2 - 1  # neighbour colour: +-1 in hexagon order
    wrong = kind == BASE_KINDS.index("wrong_colour")
    color[wrong] = (color[wrong] + step[wrong]) % NUM_COLOURS

    tops, lefts, counts = _shift_table(config)
    pick = (torch.rand(n, generator=generator) * counts[position]).long().clamp(max=tops.shape[1] - 1)
    shifted = kind == BASE_KINDS.index("shifted")
    top = torch.where(shifted, tops[position, pick], top)
    left = torch.where(shifted, lefts[position, pick], left)

    low, high = config.faded_range
    level = low + (high - low) * torch.rand(n, generator=generator)
    level = torch.where(kind == BASE_KINDS.index("faded"), level, torch.ones(n))

    unit = (
        square_masks(top, left, config)[:, None] * colour_table()[color][:, :, None, None] * level[:, None, None, None]
    )
    unit = unit + config.pixel_noise * torch.randn(unit.shape, generator=generator)
    return unit * 2.0 - 1.0, kind


# ----------------------------------------------------------------------------------------------
# model, scheduler, sampling
# ----------------------------------------------------------------------------------------------


def make_unet(config: WorldConfig):
    """A tiny ``UNet2DConditionModel`` (float32, random init from the seed): 3 channels in and
    out, ``unet_channels`` at 8x8 and 4x4, one layer per block, cross-attention on
    ``[B, 2, embed_dim]`` prompt tokens at the 4x4 level, no mid block (it would add ~20 % to
    every forward for little gain at this size)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 7919 + 3)
        return UNet2DConditionModel(
            sample_size=config.image_size,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=tuple(config.unet_channels),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type=None,
            cross_attention_dim=config.embed_dim,
            attention_head_dim=4,
            norm_num_groups=8,
        )


def make_scheduler():
    """The training noise schedule: ``DDPMScheduler`` with 1000 steps, cosine betas
    (``squaredcos_cap_v2``, suited to pixel-space images), epsilon prediction, x0 clipped to [-1, 1]."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True
    )


@torch.no_grad()
def ddim_sample(unet, cond: torch.Tensor, *, steps: int, seed: int, batch_size: int = 512) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) samples, float32 ``[N, 3, H, W]``, for prompt tokens
    ``cond [N, L, D]``; the starting noise comes from ``seed`` (the same seed gives every model
    the same noise). The UNet's ``training`` flag is restored afterwards."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(make_scheduler().config)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((cond.shape[0], unet.config.in_channels, size, size), generator=gen)
    was_training = unet.training
    unet.eval()
    device = next(unet.parameters()).device
    out = []
    try:
        for start in range(0, x.shape[0], batch_size):
            xs = x[start : start + batch_size].to(device)
            cs = cond[start : start + batch_size].to(device)
            for t in scheduler.timesteps:
                eps = unet(xs, t, cs).sample
                xs = scheduler.step(eps, t, xs).prev_sample
            out.append(xs.float().cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out)


def pretrain_base(config: WorldConfig, progress: Optional[Callable[[int], None]] = None):
    """The base model: :func:`make_unet` trained for ``pretrain_steps`` with the plain denoising
    loss (MSE on epsilon, uniform timesteps) on :func:`draw_base_images` of all 54 prompts; the
    returned UNet is the EMA of the weights (float32, CPU, eval mode). ``progress(step)`` is
    called after each step."""
    import copy

    unet = make_unet(config)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = make_scheduler()
    table = embedding_table(config)
    gen = torch.Generator().manual_seed(config.seed * 31 + 5)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.pretrain_lr, weight_decay=1e-2)
    warmup = max(1, config.pretrain_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    unet.train()
    for step in range(config.pretrain_steps):
        prompts = torch.randint(0, NUM_PROMPTS, (config.pretrain_batch,), generator=gen)
        images, _ = draw_base_images(prompts, config, gen)
        noise = torch.randn(images.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=gen)
        pred = unet(scheduler.add_noise(images, noise, t), t, table[prompts]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.pretrain_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1.0 - decay)
        if progress is not None:
            progress(step)
    return ema.eval()


def sample_pairs(config: WorldConfig, unet) -> Dict[str, torch.Tensor]:
    """``num_pairs`` pairs of DDIM samples of ``unet`` on the training prompts (each prompt
    ``num_pairs / 45`` times, in a seeded order), stored winner first by :func:`reward`:

    ``latents`` float32 ``[N, 2, 3, H, W]``; ``prompt`` int64 ``[N]``; ``reward`` float32
    ``[N, 2]`` (``reward[:, 0] >= reward[:, 1]``)."""
    train, _ = split_prompts(config)
    rng = np.random.default_rng([config.seed, 0xA1B5])
    prompt = torch.from_numpy(rng.permutation(np.resize(train.numpy(), config.num_pairs))).long()
    cond = embedding_table(config)[prompt.repeat_interleave(2)]
    images = ddim_sample(unet, cond, steps=config.sample_steps, seed=config.seed * 101 + 7).view(
        config.num_pairs, 2, 3, config.image_size, config.image_size
    )
    rewards = reward(images.flatten(0, 1), prompt.repeat_interleave(2), config).view(-1, 2)
    swap = rewards[:, 1] > rewards[:, 0]
    images = torch.where(swap[:, None, None, None, None], images.flip(1), images)
    rewards = torch.where(swap[:, None], rewards.flip(1), rewards)
    return {"latents": images.contiguous(), "prompt": prompt, "reward": rewards.contiguous()}


@torch.no_grad()
def evaluate(unet, config: WorldConfig, *, seed: int = 12345) -> Dict[str, object]:
    """Mean reward of ``eval_samples`` DDIM samples per held-out prompt, all from noise seed
    ``seed``. Returns ``{"mean": float, "per_colour": {name: float}}`` (every colour has a
    held-out prompt)."""
    _, held_out = split_prompts(config)
    prompt = held_out.repeat_interleave(config.eval_samples)
    images = ddim_sample(unet, embedding_table(config)[prompt], steps=config.sample_steps, seed=seed)
    r = reward(images, prompt, config)
    colors = prompt_colour(prompt)
    per_colour = {name: float(r[colors == i].mean()) for i, name in enumerate(colour_names())}
    return {"mean": float(r.mean()), "per_colour": per_colour}


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    """A built world: its config, the base UNet's weights, the pairs and the prompt split."""

    config: WorldConfig
    base_state: Dict[str, torch.Tensor]
    pairs: Dict[str, torch.Tensor]
    base_reward: Dict[str, object]
    path: Optional[Path] = None
    built_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)
    _base: Optional[torch.nn.Module] = dataclasses.field(default=None, repr=False, compare=False)

    def base_unet(self):
        """A fresh float32 copy of the base UNet (train mode: ready for a trainer). The first call
        builds it; later ones deep-copy that one (diffusers' constructor costs about a second)."""
        import copy

        if self._base is None:
            self._base = make_unet(self.config)
            self._base.load_state_dict(self.base_state)
        return copy.deepcopy(self._base).train()

    @property
    def table(self) -> torch.Tensor:
        return embedding_table(self.config)


def load_or_build(config: WorldConfig, cache_dir, progress: Optional[Callable[[str, int, int], None]] = None) -> World:
    """The world for ``config``, from ``cache_dir/world-<config.key()>/`` when it is there (the key
    hashes the config and :data:`FORMAT_VERSION`), else built (pretraining, pair sampling, base
    evaluation) and saved there, each file written atomically (``base_unet.pt``, ``pairs.pt``,
    then ``world.json``, whose presence marks a complete cache). ``progress(stage, done, total)``
    reports the pretraining steps."""
    path = Path(cache_dir) / f"world-{config.key()}"
    files = {name: path / name for name in ("base_unet.pt", "pairs.pt", "world.json")}
    if all(f.exists() for f in files.values()):
        meta = json.loads(files["world.json"].read_text())
        if meta.get("config") == json.loads(json.dumps(config.to_dict())):
            return World(
                config=config,
                base_state=torch.load(files["base_unet.pt"], weights_only=True),
                pairs=torch.load(files["pairs.pt"], weights_only=True),
                base_reward=meta["base_reward"],
                path=path,
                built_seconds=meta.get("built_seconds", {}),
            )
    seconds = {}
    start = time.perf_counter()
    report = None if progress is None else (lambda step: progress("pretrain", step + 1, config.pretrain_steps))
    unet = pretrain_base(config, report)
    seconds["pretrain"] = time.perf_counter() - start
    start = time.perf_counter()
    pairs = sample_pairs(config, unet)
    seconds["pairs"] = time.perf_counter() - start
    base_reward = evaluate(unet, config)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    path.mkdir(parents=True, exist_ok=True)
    write_atomic(files["base_unet.pt"], lambda tmp: torch.save(state, tmp))
    write_atomic(files["pairs.pt"], lambda tmp: torch.save(pairs, tmp))
    meta = {"config": config.to_dict(), "format": FORMAT_VERSION, "base_reward": base_reward, "built_seconds": seconds}
    write_json_atomic(files["world.json"], meta)
    return World(
        config=config, base_state=state, pairs=pairs, base_reward=base_reward, path=path, built_seconds=seconds
    )
