"""dynatrack.plots: PNGs decode, and the 2-D slice figure shows the exact regions, each pixel in the
colour of the activation pattern of the input it stands for (recomputed independently)."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pytest
import torch

from dynatrack import plots
from dynatrack.analysis import regions as reg


def _tiny_layers(seed: int = 0) -> list[reg.AffineLayer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU(),
                              torch.nn.Linear(5, 2))
    return reg.piecewise_linear_layers(net, 4)


def _png(draw) -> np.ndarray:  # noqa: ANN001
    buf = io.BytesIO()
    draw(buf)
    buf.seek(0)
    return mpimg.imread(buf, format="png")


def test_slice_pixels_have_the_colour_of_their_pattern():
    """Render one slice without edges or antialiasing; map pixel centres back to (s, t), compute the
    pattern there with a plain forward pass, and compare with the pixel's colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = _tiny_layers()
    rng = np.random.default_rng(1)
    sl = reg.slice_through(*rng.normal(size=(3, 4)))
    r = reg.count_regions_2d(layers, sl.origin, sl.u1, sl.u2)
    assert 8 <= r.count <= 60

    fig = Figure(figsize=(5, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    coll = plots.draw_slice(ax, r.polygons(), r.patterns, edges=False)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    h, w, _ = img.shape

    colours = {tuple(c) for c in img.reshape(-1, 3)}
    region_colours = [tuple(c) for c in np.round(plots.pattern_colors(r.patterns) * 255).astype(int)]
    assert len(set(region_colours)) == r.count == len(coll.get_paths()), "one polygon, one colour per region"
    pixel = (2 / w) * (2 / h)
    big = {c for c, area in zip(region_colours, r.areas()) if area >= 10 * pixel}
    assert len(big) >= r.count - 3
    assert big <= colours <= set(region_colours), "every region of 10+ pixels is visible, nothing else"

    # pixel (row, col) centre -> (s, t) in data coordinates -> pattern by a plain forward pass
    inv = ax.transData.inverted()
    rows, cols = rng.integers(0, h, 400), rng.integers(0, w, 400)
    st = inv.transform(np.stack([cols + 0.5, h - rows - 0.5], axis=1))
    x = sl.origin + st[:, :1] * sl.u1 + st[:, 1:] * sl.u2
    expected = np.round(plots.pattern_colors(reg.activation_patterns(layers, x)) * 255).astype(int)
    match = (img[rows, cols] == expected).all(axis=1)
    assert match.mean() >= 0.97, match.mean()  # only pixels cut by a region boundary may differ


def test_plot_slices_counts_colours_per_panel_and_decodes():
    layers = _tiny_layers(2)
    panels = []
    for scale in (0.5, 1.0, 2.0):
        sl = reg.slice_through(np.eye(4)[0], np.eye(4)[1], -np.eye(4)[2], scale=scale)
        r = reg.count_regions_2d(layers, sl.origin, sl.u1, sl.u2)
        panels.append({"step": int(scale * 10), "polygons": r.polygons(), "patterns": r.patterns})
    buf = io.BytesIO()
    drawn = plots.plot_slices(panels, buf)
    assert drawn == [len(p["polygons"]) for p in panels]
    buf.seek(0)
    img = mpimg.imread(buf, format="png")
    assert img.shape[1] > 2 * img.shape[0], "three panels side by side"


def test_pattern_colours_follow_patterns_and_never_collide():
    rng = np.random.default_rng(0)
    patterns = np.unique(rng.random((3000, 40)) > 0.5, axis=0)
    c = np.round(plots.pattern_colors(patterns) * 255).astype(int)
    assert len({tuple(x) for x in c}) == len(patterns)
    assert (c.min(axis=1) >= 40).all() and (c.max(axis=1) <= 220).all()
    again = np.round(plots.pattern_colors(patterns[::-1]) * 255).astype(int)[::-1]
    np.testing.assert_array_equal(c, again)  # the colour is the pattern's, not its position


@pytest.mark.parametrize("name", ["training", "regions", "local_complexity", "partitions", "patterns"])
def test_each_plot_decodes_and_is_not_blank(name):
    steps = [0, 1, 2, 5, 10, 50]
    tables = {
        "training": pa.table({"step": steps, "loss": [2.3, 2.0, 1.8, 1.2, 0.8, 0.3], "lr": [1e-3] * 6,
                              "grad_norm": [5.0, 4.0, 3.5, 2.0, 1.5, 0.9]}),
        "regions": pa.table({"step": steps * 2, "kind": ["1d"] * 6 + ["2d"] * 6, "count": list(range(12)),
                             "normalized": [i / 12 for i in range(12)]}),
        "local_complexity": pa.table({"step": steps, "layer": ["fc1"] * 6, "radius": [0.1] * 6,
                                      "lc_sum": [10, 9, 8, 7, 6, 5], "n_samples": [4] * 6}),
        "partitions": pa.table({"step": steps, "layer": ["fc1"] * 6, "partition": ["dead", "mixed"] * 3,
                                "neurons": [1, 2, 3, 4, 5, 6]}),
        "patterns": pa.table({"step": steps, "layer": ["fc1"] * 6, "split": ["train"] * 6,
                              "distinct": [5, 6, 7, 8, 9, 10]}),
    }
    fn = getattr(plots, f"plot_{name}")
    img = _png(lambda f: fn(tables[name], f))
    assert img.ndim == 3 and img.shape[0] > 100
    assert img[..., :3].std() > 0.02
