"""The Adaptive-DPO paper's own label-flip figures (SD 1.5, Pick-a-Pic v2 validation split), as
printed in its tables, and the shares the toy study is compared with: what share of clean
DPO's gain DPO keeps under flips, and how much of Adaptive-DPO's lead over DPO is specific to the
flips (its lead at a flip rate minus its lead at 0 %). The four metrics are ImageReward (IR),
PickScore (PS), Aesthetic score (Aes) and HPS; ``python -m fastpref.demo.paper`` prints them.

Sources: the pretrained model and both methods at 0 % flips: Tab. 3 (SD1.5 rows "Pretrain",
"Diffusion-DPO", "Ours", Pick-a-Pic Valid columns); DPO at 10-30 %: Tab. 1 (copied into Tab. 2);
Adaptive-DPO ("Ours") at 10-30 %: Tab. 2 (the same values as Tab. 8's Pick-a-Pic Valid columns).
"""

from __future__ import annotations

import sys
from typing import Dict

METRICS = ("IR", "PS", "Aes", "HPS")
PRETRAIN = {"IR": -0.15, "PS": 20.58, "Aes": 5.16, "HPS": 26.02}  # Tab. 3, SD1.5 Pretrain
# rate (%) -> metric -> value
DPO = {
    0: {"IR": 0.16, "PS": 21.05, "Aes": 5.31, "HPS": 26.43},  # Tab. 1 / Tab. 3
    10: {"IR": 0.05, "PS": 20.91, "Aes": 5.27, "HPS": 26.32},  # Tab. 1 / Tab. 2
    20: {"IR": 0.00, "PS": 20.83, "Aes": 5.24, "HPS": 26.24},
    30: {"IR": -0.05, "PS": 20.72, "Aes": 5.21, "HPS": 26.14},
}
ADAPTIVE = {
    0: {"IR": 0.43, "PS": 21.35, "Aes": 5.44, "HPS": 26.76},  # Tab. 3, "Ours"
    10: {"IR": 0.39, "PS": 21.40, "Aes": 5.43, "HPS": 26.77},  # Tab. 2, "Ours"
    20: {"IR": 0.34, "PS": 21.31, "Aes": 5.44, "HPS": 26.66},
    30: {"IR": 0.31, "PS": 21.26, "Aes": 5.41, "HPS": 26.50},
}


def flip_figures() -> Dict[str, dict]:
    """Per flip rate (10, 20, 30) and metric, with the range over the four metrics:
    ``dpo_keeps_share_of_clean_gain`` ``(D_r - P) / (D_0 - P)``, ``adaptive_share_of_clean_dpo_gain``
    ``(A_r - P) / (D_0 - P)``, ``adaptive_flip_specific_advantage``
    ``((A_r - D_r) - (A_0 - D_0)) / (D_0 - P)`` and ``adaptive_minus_dpo_at_0_share``
    ``(A_0 - D_0) / (D_0 - P)`` (P the pretrained model, D DPO, A Adaptive-DPO)."""
    out: Dict[str, dict] = {}
    for rate in sorted(DPO)[1:]:
        figures: Dict[str, dict] = {}
        for metric in METRICS:
            p, d0, a0 = PRETRAIN[metric], DPO[0][metric], ADAPTIVE[0][metric]
            d, a = DPO[rate][metric], ADAPTIVE[rate][metric]
            gain = d0 - p
            figures[metric] = {
                "dpo_keeps_share_of_clean_gain": (d - p) / gain,
                "adaptive_share_of_clean_dpo_gain": (a - p) / gain,
                "adaptive_flip_specific_advantage": ((a - d) - (a0 - d0)) / gain,
                "adaptive_minus_dpo_at_0_share": (a0 - d0) / gain,
            }
        ranges = {
            name: [min(figures[m][name] for m in METRICS), max(figures[m][name] for m in METRICS)]
            for name in figures[METRICS[0]]
        }
        out[str(rate)] = {"by_metric": figures, "range": ranges}
    return out


def main() -> int:
    for rate, row in flip_figures().items():
        print(f"{rate} % flips (SD 1.5, Pick-a-Pic Valid; Tab. 1-3):")
        for name, (low, high) in row["range"].items():
            each = ", ".join(f"{m} {100 * row['by_metric'][m][name]:.0f} %" for m in METRICS)
            print(f"  {name}: {100 * low:.0f}-{100 * high:.0f} % ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
