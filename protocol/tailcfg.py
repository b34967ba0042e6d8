"""Re-export of :mod:`projections.tailcfg` under the protocol package.

The wire structs live in ``projections`` because the pure netmap builder
produces :class:`~projections.tailcfg.MapResponse` values and imports only
point ``projections -> protocol`` (style rule 1). Protocol code may import
them from here for readability; both names refer to the same objects.
"""

from projections.tailcfg import *  # noqa: F403
from projections.tailcfg import __all__ as __all__
