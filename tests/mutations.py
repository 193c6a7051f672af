"""Apply one-line regressions to a copy of the tree, one at a time, and check that the tests catch each one.

Issue 21 and later reviews found that each of these changes to the library passed the whole suite; the tests named beside each
now fail on it. Rerun after changing the recovery, the accounting, the planning or the figures:

    OMP_NUM_THREADS=1 python tests/mutations.py            # every mutation, one pytest run each
    python tests/mutations.py --only distillation          # the mutations whose name contains a word
    python tests/mutations.py --list

The repository itself is never modified: the library, the tests, the app and the benchmarks are copied to a
temporary folder, the tests are run there on the unchanged copy first (they must pass), then once per mutation
(they must fail). A mutation whose line is no longer in its file is reported as "stale" — update its text here
when you rewrite that line. Exit status 0 only when every mutation is caught. (The file's name does not start
with ``test_``, so pytest does not collect it.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REG = "tests/test_recovery_regressions.py"


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once in ``path``) by ``new``; ``tests`` must then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("distillation term dropped from the recovery objective", "cka_analysis/recovery.py",
             "loss = (1 - c.kd_alpha) * loss + c.kd_alpha * distillation_loss(logits, t_logits, c.kd_temperature)",
             "loss = (1 - c.kd_alpha) * loss",
             (f"{REG}::test_objective_on_a_fixed_batch_is_the_documented_combination",)),
    Mutation("feature-mimicking term dropped from the recovery objective", "cka_analysis/recovery.py",
             "loss = loss + weight * feat", "loss = loss",
             (f"{REG}::test_objective_on_a_fixed_batch_is_the_documented_combination",)),
    Mutation("feature weight never advances along its cosine schedule (progress not wired)",
             "cka_analysis/recovery.py",
             "objective.progress = lambda: trainer.step / max(1, spec.total_steps)", "pass",
             (f"{REG}::test_feature_weight_follows_its_cosine_schedule_through_training",)),
    Mutation("recovery's optimiser barely moves the weights (learning rate scaled by 1e-6)",
             "cka_analysis/recovery.py", "lr=cfg.lr,", "lr=cfg.lr * 1e-6,",
             ("tests/test_recovery.py::test_each_method_recovers_within_budget",)),
    Mutation("fine-tuning's optimiser barely moves the weights (learning rate scaled by 1e-7)",
             "cka_analysis/training.py", "spec = TrainSpec(total_steps=total, lr=config.lr,",
             "spec = TrainSpec(total_steps=total, lr=config.lr * 1e-7,",
             ("tests/test_training.py::test_finetune_repairs_a_damaged_model",
              "tests/test_training.py::test_distillation_uses_the_teacher")),
    Mutation("recovery's objective built from the default recipe instead of the run's", "cka_analysis/recovery.py",
             "objective = RecoveryObjective(cfg, model, tap_teacher)",
             "objective = RecoveryObjective(RecoveryConfig(seed=cfg.seed), model, tap_teacher)",
             (f"{REG}::test_training_builds_the_runs_objective_with_the_unpruned_teacher",)),
    Mutation("recovery distils from a copy of the pruned student instead of the unpruned teacher",
             "cka_analysis/recovery.py",
             'copy.deepcopy(teacher).eval()\n', 'copy.deepcopy(model).eval()\n',
             (f"{REG}::test_training_builds_the_runs_objective_with_the_unpruned_teacher",)),
    Mutation("recovery's images_seen leaves out the batch-norm images", "cka_analysis/recovery.py",
             "result.images_seen = spent + tr.images", "result.images_seen = tr.images",
             (f"{REG}::test_one_shot_run_counts_every_image_exactly",
              f"{REG}::test_iterative_run_gives_each_of_k_steps_its_share_and_counts_every_image")),
    Mutation("run_prune's images_seen leaves out the batch-norm images", "cka_analysis/workflow.py",
             "self.images_seen += int(res.images_seen)",
             "self.images_seen += int(res.images_seen) - int(res.bn_images)",
             (f"{REG}::test_one_shot_run_counts_every_image_exactly",
              f"{REG}::test_iterative_run_gives_each_of_k_steps_its_share_and_counts_every_image")),
    Mutation("iterative steps get the share computed for one step instead of k", "cka_analysis/workflow.py",
             "per_step, _ = cfg.split_iterative(_max_steps(req, runner.base, costs))",
             "per_step, _ = cfg.split_iterative(1)",
             (f"{REG}::test_iterative_run_gives_each_of_k_steps_its_share_and_counts_every_image",)),
    Mutation("the timing stand-in removes every removable block whatever the target", "cka_analysis/workflow.py",
             "return remove_blocks(model, chosen)", "return remove_blocks(model, list(uniform))",
             (f"{REG}::test_stand_in_is_the_smallest_removal_that_meets_the_target",)),
    Mutation("hand-picked blocks and targets checked only after the data is loaded", "cka_analysis/workflow.py",
             "    check_feasible(request, base)\n", "    pass\n",
             (f"{REG}::test_bad_blocks_and_targets_are_refused_before_any_data_is_loaded",)),
    Mutation("the request's seed not passed to a recovery given as a RecoveryConfig", "cka_analysis/workflow.py",
             'self._set("recovery", self.recovery.seeded(self.seed))', 'self._set("recovery", self.recovery)',
             ("tests/test_one_rule.py",)),
    Mutation("recover further with the default recipe instead of the run's", "cka_analysis/workflow.py",
             "return replace(recipe, images=wanted.images, name=wanted.name, preset_images=None)",
             "return replace(wanted, preset_images=None)",
             ("tests/test_one_rule.py::test_recover_further_goes_on_with_the_runs_recipe",)),
    Mutation("running dashboard jobs not stopped at exit (the process aborts)", "app/dashboard/jobs.py",
             "atexit.register(stop_all)", "pass",
             ("tests/test_jobs_queue.py::test_the_process_exits_cleanly_while_a_dashboard_run_is_in_progress",)),
    Mutation("reference curve interpolated linearly instead of on a log scale", "cka_analysis/recovery.py",
             "t = (math.log(images) - math.log(lo)) / (math.log(hi) - math.log(lo))",
             "t = (images - lo) / (hi - lo)",
             (f"{REG}::test_reference_curve_is_interpolated_on_a_log_scale",)),
    Mutation("heatmap cells sized by the columns only (a tall matrix overflows)", "cka_analysis/figures.py",
             "cell = size / max(len(nx), len(ny))", "cell = size / len(nx)",
             ("tests/test_figures.py::test_cka_heatmap_cells_are_square_and_the_colour_bar_is_beside_it",)),
    Mutation("a resumed training forgets where its checkpointed stretch ran (device record)",
             "cka_analysis/training.py",
             'r.devices = [dict(d) for d in saved.get("devices") or [{"from_step": 0, "device": None}]]', "pass",
             ("tests/test_resume.py::test_finetune_resumed_after_a_cancel_ends_with_the_uninterrupted_weights",)),
    Mutation("report.json drops where the recovery's stretches ran (device record)", "cka_analysis/records.py",
             'out["devices"] = [dict(d) for d in self.devices]', "pass",
             ("tests/test_one_rule.py::test_a_recovery_record_carries_every_fact_of_the_result_it_was_made_from",)),
    Mutation("a resumed iterative run's wall time leaves out the saved steps' time", "cka_analysis/pruning.py",
             "result.resumed_seconds = float(sum(s.seconds for s in result.steps))", "pass",
             ("tests/test_pruning.py::test_iterative_resume_goes_on_like_the_uninterrupted_run",
              "tests/test_resume.py::test_cli_iterative_prune_resumed_after_a_kill_ends_with_the_uninterrupted_record")),
)


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("cka_analysis", "tests", "app", "benchmarks", "assets", "scripts"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)


def _run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(whether the tests passed, the last lines of pytest's output) in the copy at ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=root, env=env, capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode == 0, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only.lower() in m.name.lower()]
    if args.list or not chosen:
        for m in chosen or MUTATIONS:
            print(f"- {m.name}  ({m.path})\n    " + "\n    ".join(m.tests))
        return 0 if chosen else 2
    with tempfile.TemporaryDirectory(prefix="cka-prune-mutations-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        all_tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        ok, tail = _run_tests(root, all_tests)
        if not ok:
            print(f"the tests fail on the unchanged tree; fix them first:\n{tail}")
            return 2
        results = []
        for m in chosen:
            target = root / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                results.append((m, "stale", f"{m.old!r} occurs {original.count(m.old)} times in {m.path}"))
                continue
            target.write_text(original.replace(m.old, m.new))
            start = time.perf_counter()
            try:
                passed, tail = _run_tests(root, m.tests)
            finally:
                target.write_text(original)
            results.append((m, "missed" if passed else "caught", f"{time.perf_counter() - start:.0f} s"))
    for m, verdict, note in results:
        print(f"{verdict:>6}  {m.name}  ({note})")
    missed = [m for m, verdict, _ in results if verdict != "caught"]
    print(f"{len(results) - len(missed)}/{len(results)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
