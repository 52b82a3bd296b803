"""Figures of ``prefdyn preflight``, as PNG bytes for the self-contained HTML page.

Each function takes the report's stored tables only (``preflight_curves``,
``preflight_behaviors``, ``preflight_reweighting``, ``preflight_ches``) and returns
the PNG image as ``bytes``; the page embeds them as base64 ``data:`` URIs.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from figures.style import THEORY_STYLE, palette, plt, theme

__all__ = ["png", "curves_figure", "reweighting_figure", "ches_figure"]


def png(fig, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes (then closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _short(name: str, width: int = 26) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def curves_figure(curves: pd.DataFrame, behaviors: pd.DataFrame, *, title: str) -> bytes:
    """Loss and reward accuracy per behavior, trained together: measured (solid)
    with the Gaussian-fit prediction dashed over it, natural weights on the left two
    panels, the suggested weights' prediction on the right."""
    theme()
    names = list(behaviors["behavior"])
    colours = palette(names)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    natural = curves[curves["weights"] == "natural"]
    for name in names:
        for source, style in (("measured", dict(linewidth=2.2, alpha=0.55)),
                              ("theory", THEORY_STYLE)):
            part = natural[(natural["behavior"] == name) & (natural["source"] == source)]
            label = _short(name) if source == "measured" else None
            axes[0].plot(part["t"], part["loss"], color=colours[name], label=label, **style)
            axes[1].plot(part["t"], part["reward_accuracy"], color=colours[name], **style)
        part = curves[(curves["weights"] == "suggested") & (curves["behavior"] == name)
                      & (curves["source"] == "theory")]
        axes[2].plot(part["t"], part["loss"], color=colours[name], **THEORY_STYLE)
    for ax in (axes[0], axes[2]):
        ax.axhline(np.log(2), color="0.6", lw=0.8, ls=":")
    axes[0].set(xlabel="t = lr · step", ylabel="training loss",
                title="trained together: measured (solid), predicted (dashed)")
    axes[1].set(xlabel="t = lr · step", ylabel="implicit-reward accuracy",
                title="reward accuracy")
    axes[2].set(xlabel="t = lr · step", ylabel="training loss",
                title="predicted with the suggested weights")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return png(fig)


def reweighting_figure(rows: pd.DataFrame, summary: pd.DataFrame) -> bytes:
    """The spread of measured learning speeds across behaviors per seed, with the
    data's own weights and with the suggested ones (one panel per speed)."""
    theme()
    kinds = list(summary["speed"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6),
                             layout="constrained", squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        part = rows[rows["speed"] == kind]
        for x, label in enumerate(("natural", "suggested")):
            values = part[part["weights"] == label]["spread"].to_numpy()
            ax.scatter(np.full(len(values), x) + np.linspace(-0.08, 0.08, len(values)),
                       values, s=18, alpha=0.7)
            ax.errorbar(x + 0.2, values.mean(), yerr=values.std(ddof=1) if len(values) > 1
                        else 0, fmt="o", color="0.1", capsize=3)
        row = summary[summary["speed"] == kind].iloc[0]
        ax.set(xticks=[0, 1], xticklabels=["data's weights", "suggested"],
               ylabel="spread (sd/|mean|) of speeds",
               xlabel="dots: bootstrap seeds; black: mean ± sd over seeds",
               title=f"{kind} speed: shrinks by {row['shrink']:.2f} "
                     f"[{row['shrink_low']:.2f}, {row['shrink_high']:.2f}]")
    return png(fig)


def ches_figure(ches: pd.DataFrame) -> bytes:
    """The distribution of CHES over the pairs, the top ranks marked."""
    theme()
    fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
    ax.hist(ches["ches"], bins=40, color="0.55")
    top = ches.nsmallest(min(10, len(ches)), "rank")
    for value in top["ches"]:
        ax.axvline(value, color="C3", lw=0.8, alpha=0.8)
    ax.set(xlabel="CHES = ⟨S_w, S_l⟩ − ‖S_w‖²", ylabel="pairs",
           title="CHES over the pairs (red: the 10 most at risk)")
    return png(fig)
