"""Reports: results.json, report.md, plots/*.png, written atomically into run directories."""

from leanlm.report.results import (
    atomic_write_json,
    atomic_write_text,
    check_new_output,
    git_info,
    ordinary_modes,
    staged_output,
    versions,
)

__all__ = ["atomic_write_json", "atomic_write_text", "check_new_output", "git_info", "ordinary_modes", "staged_output", "versions"]
