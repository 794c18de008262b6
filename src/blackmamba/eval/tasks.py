"""lm-evaluation-harness tasks on a BlackMamba model (``blackmamba eval MODEL --tasks ...``).

Task names are looked up in ``include_paths`` folders and in the task files named in ``tasks`` first; lm-eval's own
task index (thousands of tasks, tens of seconds to build) is read only when a name is not found there.
"""

from __future__ import annotations

from pathlib import Path


def _task_manager(specs: list[str], include: list[Path]):
    """A TaskManager that indexes lm-eval's own tasks only if some name is not found locally."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_defaults=False, include_path=[str(d) for d in include] or None)
    names = [s for s in specs if not Path(s).is_file()]
    if all(local.match_tasks([n]) for n in names):
        return local
    manager = TaskManager(include_path=[str(d) for d in include] or None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm_eval ls tasks`)")
    return manager


def evaluate_tasks(model, tasks: list[str], *, tokenizer=None, batch_size: int = 1, device: str | None = None,
                   dtype: str = "float32", quantize: str | None = None, group_size: int = 32,
                   limit: float | None = None, num_fewshot: int | None = None,
                   include_paths: list[Path] = ()) -> dict:
    """lm-eval's ``simple_evaluate`` results of ``tasks`` (names, groups or task YAML files) for ``model`` (a folder
    or hub id). ValueError for an unknown task."""
    import lm_eval

    from .lm_eval_adapter import BlackMambaEvalLM

    manager = _task_manager(tasks, list(include_paths))
    lm = BlackMambaEvalLM(model, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype,
                          quantize=quantize, group_size=group_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, log_samples=False)
