"""leanlm: make a pretrained decoder-only LLM cheaper to run after pretraining, with honest numbers."""

__version__ = "0.1.0"

from leanlm.errors import LeanLMError

__all__ = ["LeanLMError", "__version__"]
