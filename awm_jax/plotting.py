"""Writing a finished matplotlib figure to disk (shared by every report that plots)."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lays out ``figure``, writes it to ``path`` (parent directories created), closes it
    (figures are not garbage-collected while pyplot tracks them) and returns the path."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
