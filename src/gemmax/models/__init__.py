"""Model families: one module or subpackage per family, each registered by model type on import.

``gemmax.models.base`` defines the interface (:class:`~gemmax.models.base.Family`) and the registry;
importing this package registers every built-in family.
"""

from gemmax.models import base
from gemmax.models import gemma as _gemma  # noqa: F401  (registers the family)
from gemmax.models import gemma3_vision as _gemma3_vision  # noqa: F401
from gemmax.models import gemma3n as _gemma3n  # noqa: F401
from gemmax.models import gemma4 as _gemma4  # noqa: F401
from gemmax.models import paligemma as _paligemma  # noqa: F401
from gemmax.models import recurrent_gemma as _recurrent_gemma  # noqa: F401

__all__ = ["base"]
