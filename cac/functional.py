"""``cac.functional``: the paper's equations; kept at this path for users, defined in :mod:`cac.core.functional`."""
from cac.core.functional import *  # noqa: F401,F403
from cac.core.functional import __all__  # noqa: F401
