"""cycdata: general cyclical training for PyTorch (start easy, train hard, finish easy).

The core holds the pure pieces: the cyclical coefficient and schedules, the clock, the config
language and the plan. Loaders, the augmentation ladder and the trainer live in
``cycdata.loaders``, ``cycdata.augment_ladder`` and ``cycdata.train``.

Example:
    >>> import cycdata
    >>> round(cycdata.xi(4, 10, factor=2), 6)
    0.111111
    >>> cycdata.Cyclical(easy=0.5, hard=2.0)(0.5)
    2.0
"""

from cycdata.clock import Clock
from cycdata.config import ConfigError, RunConfig, load_config, parse_config
from cycdata.plan import Knob, Plan
from cycdata.schedules import (
    SCHEDULES,
    SHAPES,
    Clamp,
    Constant,
    Cosine,
    Cyclical,
    Join,
    Linear,
    Piecewise,
    Quantize,
    Schedule,
    Warmup,
    make_schedule,
    register_schedule,
    register_shape,
    xi,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "SHAPES",
    "Clamp",
    "Clock",
    "ConfigError",
    "Constant",
    "Cosine",
    "Cyclical",
    "Join",
    "Knob",
    "Linear",
    "Piecewise",
    "Plan",
    "Quantize",
    "RunConfig",
    "Schedule",
    "Warmup",
    "load_config",
    "make_schedule",
    "parse_config",
    "register_schedule",
    "register_shape",
    "xi",
]
