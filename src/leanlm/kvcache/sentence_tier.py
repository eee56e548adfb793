"""The sentence tier's old module path, kept so imports written before the split keep working.

The code lives in the ``leanlm.kvcache.sentence`` package; new code imports from there.
"""

from leanlm.kvcache.sentence import *  # noqa: F403  (the package's public names)
from leanlm.kvcache.sentence import __all__  # noqa: F401
