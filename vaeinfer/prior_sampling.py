"""The two ways to draw code grids from a PixelCNN prior, position by position in raster order.

- `full_grid_loop`, the reference: the full prior graph over the whole grid once per position
  (h*w calls of the whole network; works with every bundle).
- `cached_loop`, for bundles with the cached graphs (`prior_row`, `prior_step`; see
  training/pixelcnn_step.py): the vertical stack once per row, the horizontal stack and the
  head once per position, each computing only the new position's activations; the caches are
  plain arrays passed in and out of the graphs.

Both call `choose(logits (n, K)) -> codes (n,)` once per position, in the same order, so with
the same seeded noise they draw the same codes wherever their logits round alike. They may differ
only where the two graphs' float rounding (about 1e-6) moves a logit across a boundary of the
inverse CDF that the position's uniform falls in; after such a difference the grids go on from
different contexts (each loop conditions on its own draws).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Choose = Callable[[np.ndarray], np.ndarray]


def full_grid_loop(prior, n: int, grid: tuple[int, int], labels, choose: Choose, batch_size=None,
                   progress=None) -> np.ndarray:
    """Codes (n, h, w) through the full prior graph, once per position."""
    h, w = grid
    codes = np.zeros((n, h, w), np.int64)
    feeds = {"codes": codes} if labels is None else {"codes": codes, "label": labels}
    for pos in range(h * w):
        i, j = divmod(pos, w)
        codes[:, i, j] = choose(prior.run(feeds, batch_size)[0][:, :, i, j])
        if progress is not None:
            progress(n * (pos + 1) // (h * w))
    return codes


def cached_loop(row, step, n: int, grid: tuple[int, int], codebook_size: int, cache: dict, labels,
                choose: Choose, batch_size=None, progress=None) -> np.ndarray:
    """Codes (n, h, w) through the cached graphs: `row` once per row, `step` once per position.

    `cache` is the manifest's prior.cache ({"layers", "channels", "context"}).
    """
    h, w = grid
    k, layers, channels = cache["context"], cache["layers"], cache["channels"]
    # k rows / columns of the padding code above and left of the grid: the full model's zero padding
    codes = np.full((n, h + k, w + k), codebook_size, np.int64)
    v_cache = np.zeros((n, layers - 1, w, k, channels), np.float32)
    h_zero = np.zeros((n, layers - 1, k, channels), np.float32)
    for i in range(h):
        feeds = {"above": np.ascontiguousarray(codes[:, i:i + k, k:]), "v_cache": v_cache}
        if labels is not None:
            feeds["label"] = labels
        context, v_cache = row.run(feeds, batch_size)
        h_cache = h_zero
        for j in range(w):
            feeds = {"left": np.ascontiguousarray(codes[:, i + k, j:j + k]), "h_cache": h_cache,
                     "context": np.ascontiguousarray(context[:, j])}
            logits, h_cache = step.run(feeds, batch_size)
            codes[:, i + k, j + k] = choose(logits)
            if progress is not None:
                progress(n * (i * w + j + 1) // (h * w))
    return np.ascontiguousarray(codes[:, k:, k:])
