"""Loss landscapes: directions, 1-D and 2-D slices, curvature maps, storage and plots.

Typical use::

    from flatlens import Objective
    from flatlens import landscape as fl

    obj = Objective(model, loss_fn, data)
    d1 = fl.random_direction(obj, seed=0)
    d2 = fl.random_direction(obj, seed=1)
    ls = fl.plane(obj, d1, d2, span=(-1, 1), num_points=(41, 41), store="plane.npz")
    fl.plot_contour(ls, "plane.png", filled=True)
    fl.plot_surface(ls, "plane.html")

Every grid point is evaluated by :meth:`flatlens.Objective.evaluate_points`, so the loss is
the Objective's own; ``metrics=`` adds ``"accuracy"`` or any callable
``metric(outputs, targets) -> scalar`` (combined over batches like a mean-reduced loss).
"""

from flatlens.landscape._curvature import curvature_map
from flatlens.landscape._directions import (
    Direction,
    PCADirections,
    as_direction,
    cosine,
    eigen_directions,
    interpolation_direction,
    normalize_direction,
    pca_directions,
    random_direction,
)
from flatlens.landscape._grid import grid_axis
from flatlens.landscape._plot import plot_contour, plot_line, plot_surface
from flatlens.landscape._slices import line, plane
from flatlens.landscape._storage import Landscape, load, save

__all__ = [
    "Direction",
    "Landscape",
    "PCADirections",
    "as_direction",
    "cosine",
    "curvature_map",
    "eigen_directions",
    "grid_axis",
    "interpolation_direction",
    "line",
    "load",
    "normalize_direction",
    "pca_directions",
    "plane",
    "plot_contour",
    "plot_line",
    "plot_surface",
    "random_direction",
    "save",
]
