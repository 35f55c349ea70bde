"""Before/after: ``bench/backbone_forward.py`` and ``bench/train_step.py`` of two revisions, side by side on one machine.

    python bench/compare_revisions.py --before ddb97fa --out bench/results   # a commit against the working tree
    python bench/compare_revisions.py --before HEAD --rounds 1               # the uncommitted changes
    python bench/compare_revisions.py --before A --after B --train-args "--size 512 --layers 2 --runs 5"

The before revision (and ``--after``, when given; by default the after tree is the working tree) is exported with
``git archive`` into a temporary folder: the repository is not touched. Each tree runs its own scripts on its own
code: a folder of links (``dit`` -> the tree's ``dit/``, with ``dit/pipelines``, ``dit/train`` and ``dit/configs``
linked to its ``pipelines/``, ``train/`` and ``configs/``, as pyproject's package-dir maps them) goes first on
``PYTHONPATH``, ahead of the editable install; the imports are checked to resolve into the tree before any timing.

The trees take turns, benchmark by benchmark, for ``--rounds`` rounds (the order flips every round), torch on
``--threads`` CPU threads (default 1: two threads on two cores shared with other work slow down by several times and
unevenly). Per case: the median of our model's times over every run of every round, before and after, and after /
before (``ratio``, < 1: faster). diffusers' model is the same code in both trees: its after / before ratio shows how
much the machine drifted between the trees' turns, and ``relative_ratio`` compares our time over diffusers' in the
same round of the same run instead, which that drift cancels. The two trees must record the same model config for every benchmark (else an error names the difference), as
each script writes it; ``--before-forward-args`` / ``--before-train-args`` give the before tree's scripts other
arguments where their options differ. Writes ``compare_revisions_<before>_<after>_<device>.json`` into ``--out``
(default ``runs/bench/``), with its own wall time (``wall_s``). The defaults (XL-wide blocks, 2 layers, fp32, forward
at 256 px, training step at 128 px, 3 rounds) are sized for under 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The source folders and the packages pyproject's package-dir installs them as (``dit`` first).
PACKAGES = {"dit": "dit", "pipelines": "dit.pipelines", "train": "dit.train", "configs": "dit.configs"}
BENCHES = ("backbone_forward", "train_step")
DEFAULT_ARGS = {
    "backbone_forward": "--dtypes fp32 --sizes 256 --variants alpha,sigma --layers 2 --batch 2 --runs 3",
    "train_step": "--dtype fp32 --size 128 --layers 2 --batch 2 --runs 3",
}
SUBPROCESS_TIMEOUT_S = 1800


def git(*args: str) -> str:
    """A read-only git command in the repository; its stdout, stripped."""
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def describe(revision: str | None) -> dict:
    """The full commit and its subject; for the working tree (None), HEAD and the files that differ from it."""
    if revision is None:
        changed = git("status", "--porcelain").splitlines()  # "XY path": modified, added, untracked (??)
        return {"revision": "working tree", "head": git("rev-parse", "HEAD"), "changed_files": changed}
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    return {"revision": commit, "subject": git("log", "-1", "--format=%s", commit)}


def export(commit: str, folder: Path) -> Path:
    """``git archive`` of ``commit`` unpacked into ``folder``."""
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def link_farm(tree: Path, folder: Path) -> Path:
    """A folder whose ``dit`` package is ``tree``'s (every entry of ``tree/dit`` linked, plus the other source folders
    at their package names), to go first on PYTHONPATH."""
    package = folder / "dit"
    package.mkdir(parents=True)
    for entry in (tree / "dit").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for source, name in PACKAGES.items():
        if source != "dit" and (tree / source).is_dir():
            (package / name.split(".", 1)[1]).symlink_to(tree / source)
    return folder


def tree_env(farm: Path, threads: int | None = None) -> dict:
    """The environment that imports the tree of ``farm`` (and runs torch on ``threads`` CPU threads)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(farm), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


IMPORT_CHECK = """import json, sys
import dit, dit.configs, dit.pipelines, dit.train
print(json.dumps({m: sys.modules[m].__file__ for m in ("dit", "dit.pipelines", "dit.train", "dit.configs")}))
"""


def check_imports(tree: Path, farm: Path) -> dict:
    """Where ``dit``, ``dit.pipelines``, ``dit.train`` and ``dit.configs`` are imported from by a script run as the
    benchmarks are (by path, in ``tree``, ``farm`` first); a RuntimeError when any resolves outside ``tree``."""
    script = farm / "import_check.py"
    script.write_text(IMPORT_CHECK)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tree, env=tree_env(farm), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"the tree {tree} does not import: {result.stderr[-2000:]}")
    files = {name: str(Path(path).resolve()) for name, path in json.loads(result.stdout.splitlines()[-1]).items()}
    outside = {name: path for name, path in files.items() if not Path(path).is_relative_to(tree.resolve())}
    if outside:
        raise RuntimeError(f"these packages resolve outside {tree}: {outside}")
    return files


def run_bench(tree: Path, farm: Path, bench: str, args: list[str], out: Path, threads: int | None) -> dict:
    """One run of ``tree``'s ``bench/<bench>.py`` with ``args``; its result JSON."""
    cmd = [sys.executable, str(tree / "bench" / f"{bench}.py"), *args, "--out", str(out)]
    print("$", shlex.join(cmd), flush=True)
    result = subprocess.run(
        cmd, cwd=tree, env=tree_env(farm, threads), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    if result.returncode != 0:
        raise RuntimeError(f"{bench} of {tree} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def case_times(bench: str, payload: dict) -> dict[str, dict]:
    """Per case of one result: ours' and diffusers' run times and peak memory."""
    if bench == "backbone_forward":
        cases = {f"{c['variant']} {c['size_px']}px {c['dtype']}": c for c in payload["cases"]}
    else:
        cases = {f"step {payload['config']['image_size']}px {payload['config']['dtype']}": payload}
    return {
        name: {side: {"runs_s": c[side]["runs_s"], "peak_memory_bytes": c[side]["peak_memory_bytes"]}
               for side in ("ours", "diffusers")}
        for name, c in cases.items()
    }  # fmt: skip


def config_difference(before: dict, after: dict) -> dict:
    """The keys whose values differ, as ``{key: [before, after]}`` (missing: None)."""
    return {
        k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)
    }


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """``runs[tree][bench]``: that tree's results, one per round. Per case: medians over every run, and ratios."""
    cases = {}
    for bench in runs["before"]:
        for tree in ("before", "after"):
            for payload in runs[tree][bench]:
                for name, sides in case_times(bench, payload).items():
                    entry = cases.setdefault(f"{bench}: {name}", {"before": _empty(), "after": _empty()})[tree]
                    ours, diffusers = sides["ours"]["runs_s"], sides["diffusers"]["runs_s"]
                    entry["ours"] += ours
                    entry["diffusers"] += diffusers
                    entry["relative"] += [o / d for o, d in zip(ours, diffusers)]  # run i of each: one round
                    entry["memory"].append(sides["ours"]["peak_memory_bytes"])
    return {name: _case_summary(entry) for name, entry in cases.items()}


def _empty() -> dict:
    return {"ours": [], "diffusers": [], "relative": [], "memory": []}


def _case_summary(entry: dict) -> dict:
    med = {(tree, key): statistics.median(entry[tree][key]) for tree in entry for key in entry[tree]}
    return {
        "before_median_s": round(med["before", "ours"], 5),
        "after_median_s": round(med["after", "ours"], 5),
        "ratio": round(med["after", "ours"] / med["before", "ours"], 4),
        "relative_ratio": round(med["after", "relative"] / med["before", "relative"], 4),
        "diffusers_before_median_s": round(med["before", "diffusers"], 5),
        "diffusers_after_median_s": round(med["after", "diffusers"], 5),
        "diffusers_ratio": round(med["after", "diffusers"] / med["before", "diffusers"], 4),
        "memory_ratio": round(med["after", "memory"] / med["before", "memory"], 4),
        "before_runs_s": entry["before"]["ours"],
        "after_runs_s": entry["after"]["ours"],
    }


def check_configs(bench: str, results: dict[str, list[dict]]) -> dict:
    """The model config both trees measured in ``bench`` (the same in every round); a RuntimeError otherwise."""
    configs = [payload["config"] for tree in ("before", "after") for payload in results[tree]]
    for config in configs[1:]:
        if config != configs[0]:
            raise RuntimeError(
                f"{bench}: the trees measured different configs: {config_difference(configs[0], config)}"
            )
    return configs[0]


def prepare(args, work: Path) -> dict:
    """The two trees (exported where they are revisions), their link farms, import checks and descriptions."""
    trees = {}
    for label, revision in (("before", args.before), ("after", args.after)):
        info = describe(revision)
        tree = ROOT if revision is None else export(info["revision"], work / label)
        farm = link_farm(tree, work / f"{label}_path")
        info["imports"] = check_imports(tree, farm)
        trees[label] = {"tree": tree, "farm": farm, "info": info}
    return trees


def bench_args(args, label: str, bench: str) -> list[str]:
    common = args.forward_args if bench == "backbone_forward" else args.train_args
    own = args.before_forward_args if bench == "backbone_forward" else args.before_train_args
    return [*shlex.split(own if label == "before" and own is not None else common), "--device", args.device]


def measure(args, trees: dict, work: Path) -> dict:
    """Every round: each benchmark in both trees, in turns (flipped every round); ``results[tree][bench]``."""
    results = {label: {bench: [] for bench in args.benches} for label in trees}
    for round_index in range(args.rounds):
        order = ["before", "after"] if round_index % 2 == 0 else ["after", "before"]
        for bench in args.benches:
            for label in order:
                out = work / "outputs" / f"{label}_{bench}_{round_index}.json"
                tree = trees[label]
                results[label][bench].append(
                    run_bench(
                        tree["tree"], tree["farm"], bench, bench_args(args, label, bench), out, args.threads or None
                    )
                )
            check_configs(bench, {label: results[label][bench] for label in trees})  # fail fast: before the next round
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("--after", help="the revision measured after (default: the working tree)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=3, help="turns of each tree per benchmark")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's CPU threads in the benchmarks (1: steady on shared cores; 0: torch's default)",
    )
    parser.add_argument(
        "--benches", default=",".join(BENCHES), help="a comma-separated subset of " + ", ".join(BENCHES)
    )
    parser.add_argument("--forward-args", default=DEFAULT_ARGS["backbone_forward"], help="backbone_forward's options")
    parser.add_argument("--train-args", default=DEFAULT_ARGS["train_step"], help="train_step's options")
    parser.add_argument("--before-forward-args", help="backbone_forward's options in the before tree (default: same)")
    parser.add_argument("--before-train-args", help="train_step's options in the before tree (default: same)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench", help="the folder the JSON goes into")
    args = parser.parse_args(argv)
    args.benches = args.benches.split(",")
    unknown = sorted(set(args.benches) - set(BENCHES))
    if unknown or args.rounds < 1:
        parser.error(f"--benches takes {', '.join(BENCHES)} (got {unknown}); --rounds >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-revisions-") as tmp:
        trees = prepare(args, Path(tmp))
        results = measure(args, trees, Path(tmp))
    first = results["after"][args.benches[0]][0]
    payload = {
        "benchmark": "compare_revisions",
        "device": args.device,
        "machine": {**first["machine"], "host": platform.node()},
        "before": {**trees["before"]["info"], "args": {b: bench_args(args, "before", b) for b in args.benches}},
        "after": {**trees["after"]["info"], "args": {b: bench_args(args, "after", b) for b in args.benches}},
        "rounds": args.rounds,
        "config": {bench: check_configs(bench, {t: results[t][bench] for t in results}) for bench in args.benches},
        "threads": args.threads,
        "ratio": "after / before median of our model's time (< 1: faster). relative_ratio: the same for our time over "
        "diffusers' in the same round of the same run (drift of the machine between the trees' turns cancels). "
        "diffusers_ratio: after / before of diffusers' model, whose code both trees share (that drift itself).",
        "cases": summarize(results),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    after = "worktree" if args.after is None else payload["after"]["revision"][:7]
    path = args.out / f"compare_revisions_{payload['before']['revision'][:7]}_{after}_{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    for name, case in payload["cases"].items():
        print(f"{name}: before {case['before_median_s']:.4f}s, after {case['after_median_s']:.4f}s "
              f"(x{case['ratio']}, relative to diffusers x{case['relative_ratio']}; diffusers x{case['diffusers_ratio']}), "
              f"memory x{case['memory_ratio']}")  # fmt: skip
    print(f"wrote {path} ({payload['wall_s']} s)", flush=True)
    return payload


if __name__ == "__main__":
    main()
