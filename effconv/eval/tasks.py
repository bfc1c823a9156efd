"""lm-eval-harness tasks on effconv models (and any transformers model), through lm-eval's HFLM wrapper."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import EffconvError, one_line


def _network_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def import_lm_eval():
    """Import lm-eval-harness, offline when there is no network (set before the import: the HF libraries read
    these variables once). Raises EffconvError when it is not installed."""
    if sys.modules.get("lm_eval") is None and not _network_available():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401 - not imported by `import lm_eval`
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise EffconvError(f"--tasks needs lm-eval-harness, which is not installed: pip install lm-eval ({e})") from e
    return lm_eval


def check_tasks(lm_eval, tasks: Sequence[str], include_path: str | None = None):
    """A TaskManager, after checking that every task name is known. When every task is a plain task of
    `include_path`, the manager indexes only that directory (lm-eval's own ~15K task files take longer to index
    than a small local task takes to run); otherwise it indexes both."""
    if include_path is not None and not Path(include_path).is_dir():
        raise EffconvError(f"--task-path {include_path} is not a directory")
    try:
        if include_path:
            local = lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False)
            if set(tasks) <= set(local.all_subtasks):  # tasks, not groups or tags (those may name built-in tasks)
                return local
        manager = lm_eval.tasks.TaskManager(include_path=include_path) if include_path else lm_eval.tasks.TaskManager()
        known = set(manager.all_tasks)
    except Exception as e:  # noqa: BLE001
        raise EffconvError(f"lm-eval could not list its tasks: {one_line(e)}") from e
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise EffconvError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them)")
    return manager


def run_tasks(lm_eval, manager, model, tokenizer, tasks: Sequence[str], *, limit: int | None,
              num_fewshot: int | None, batch_size: int, seed: int) -> dict:
    """lm-eval-harness on the in-memory model. Returns {task: {metric: value}} (numbers only)."""
    from lm_eval.models.huggingface import HFLM

    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, log_samples=False,
        )
    except EffconvError:
        raise
    except Exception as e:  # noqa: BLE001 - dataset download failures come as many types
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline: only datasets already in the local Hugging Face cache can be used)" if offline else ""
        raise EffconvError(f"lm-eval failed on {', '.join(tasks)}: {one_line(e)}{hint}") from e
    if results is None:
        raise EffconvError("lm-eval returned no results")
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
