"""Quiet third-party output: distill's own progress is the one a user reads.

Without `-v/--verbose`, transformers' and datasets' progress bars ("Loading weights",
"Saving the dataset", ...), their info logs and the Trainer's raw `{'loss': ...}` dicts are off.
`DISTILL_VERBOSE=1` is set for `-v` so code that builds a Trainer (and child processes) can
tell.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def verbose() -> bool:
    return os.environ.get("DISTILL_VERBOSE", "") == "1"


def quiet_third_party() -> None:
    """Silence third-party bars and info logs for this process (and spawned workers)."""
    os.environ.setdefault("DISTILL_VERBOSE", "0")
    if verbose():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for name in ("transformers", "datasets", "accelerate", "peft", "trl", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecation notices addressed to library authors ("`is_gradient_checkpointing` is
    # deprecated"), not to the person running a pipeline.
    for module in ("transformers", "trl", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    # The environment covers modules imported later; these, modules already imported.
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
