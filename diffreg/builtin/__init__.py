"""The standard plugins. Each module here is an ordinary plugin, registered through the same hooks
as a third-party package (see :mod:`diffreg.hookspecs`); read any of them as an example."""

#: Built-in plugin modules, loaded before any entry point, in this order.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "diffreg.builtin.schedules",
    "diffreg.builtin.parameterizations",
    "diffreg.builtin.losses",
    "diffreg.builtin.samplers",
    "diffreg.builtin.grids",
    "diffreg.builtin.models",
    "diffreg.builtin.guidance",
)
