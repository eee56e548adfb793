"""Behaviour probe: does a compressed student still behave like its teacher on multi-step prompts?"""

from leanlm.evaluate.probe.families import FAMILIES, ProbePrompt, check_answer, continuation_prompts, make_prompts
from leanlm.evaluate.probe.measure import ProbeConfig, compare, forced_kl, greedy_outputs, probe

__all__ = [
    "FAMILIES",
    "ProbeConfig",
    "ProbePrompt",
    "check_answer",
    "compare",
    "continuation_prompts",
    "forced_kl",
    "greedy_outputs",
    "make_prompts",
    "probe",
]
