"""The labels of ``fastpref demo``'s pairs beyond the reward's own: label flips (a seeded share
of the pairs with their label reversed) and a biased, noisy synthetic judge (DeDPO's AI labels).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from .world import WorldConfig, colour_names, prompt_colour


def flip_mask(num_pairs: int, rate: float, seed: int) -> torch.Tensor:
    """Bool ``[num_pairs]``: exactly ``round(rate * num_pairs)`` pairs, chosen by ``seed``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    count = int(round(rate * num_pairs))
    chosen = np.random.default_rng([int(seed), 0xF11B]).permutation(num_pairs)[:count]
    mask = torch.zeros(num_pairs, dtype=torch.bool)
    mask[torch.from_numpy(chosen)] = True
    return mask


def synthetic_judge(
    pairs: Dict[str, torch.Tensor],
    config: WorldConfig,
    *,
    biased_colours: Sequence[str] = ("blue", "magenta"),
    strength: float = 2.0,
    noise: float = 1.0,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A biased, noisy AI judge: its probability, float32 ``[N]``, that the stored first image
    (the reward's winner) is better, ``sigmoid(sign * strength * d + noise * z)`` with ``d`` the
    reward difference over its std across pairs, ``sign = -1`` on prompts of ``biased_colours``
    (the judge is systematically wrong there) and ``+1`` elsewhere, ``z`` standard normal from
    ``seed``. Returns ``(probability, biased)``, ``biased`` bool ``[N]``."""
    d = pairs["reward"][:, 0] - pairs["reward"][:, 1]
    d = d / d.std().clamp_min(1e-8)
    names = colour_names()
    biased = torch.zeros_like(d, dtype=torch.bool)
    for name in biased_colours:
        biased |= prompt_colour(pairs["prompt"]) == names.index(name)
    sign = 1.0 - 2.0 * biased.to(torch.float32)
    z = torch.from_numpy(np.random.default_rng([int(seed), 0x7D6E]).standard_normal(d.shape[0])).to(torch.float32)
    return torch.sigmoid(sign * strength * d + noise * z), biased
