"""The KV protocols' old module path, kept so imports written before the split keep working.

The code lives in the ``leanlm.evaluate.kv`` package (one module per protocol); new code imports from there.
"""

from leanlm.evaluate.kv import *  # noqa: F403  (the package's public names)
from leanlm.evaluate.kv import __all__  # noqa: F401
