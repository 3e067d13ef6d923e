"""Probe the installed `adaroute` command with bad inputs, each as a fresh process, as a user would.

    python benchmarks/cli_probe.py [--json out/cli_probe.json]

Runs every case of the hardening table (tests/cli/test_hardening.py) through the console script
in a new process, each in its own damaged copy of a small world of models and files, and reports:
tracebacks, exit codes other than 2, stderr that is not one line, files changed, and the wall time
to the error (the target: under 2 s for anything that needs no model weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: the tests' table

from tests.cli.test_hardening import CASES, snapshot  # noqa: E402
from tests.fixtures import make_tiny_tokenizer, write_gguf, write_hf_dir  # noqa: E402
from tests.routing.conftest import calibrated_copy  # noqa: E402


def build_world(root: Path) -> None:
    from adaroute.config import RoutingConfig
    from adaroute.routing import save_routed

    write_hf_dir(root / "dense", seed=0)
    write_gguf(root / "tiny.gguf", seed=1)
    model, _ = calibrated_copy(seed=3)
    save_routed(model, make_tiny_tokenizer(), root / "routed", "tiny", RoutingConfig(), {"data": ["x"]})
    (root / "text.txt").write_text("Lists are mutable sequences. Tuples are immutable sequences. " * 40)
    (root / "short.txt").write_text("Hi there.")
    (root / "out").mkdir()


def run_case(template: Path, argv: list[str], damage) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "w"
        shutil.copytree(template, world)
        if damage is not None:
            damage(world)
        before = snapshot(world)
        names = {"w": str(world), "dense": str(world / "dense"), "routed": str(world / "routed"),
                 "text": str(world / "text.txt")}
        args = [a.format(**names) for a in argv]
        if any("\x00" in a for a in args):
            return {"argv": argv, "skipped": "a process argument cannot hold NUL"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "adaroute", *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        seconds = time.perf_counter() - start
        lines = [ln for ln in proc.stderr.strip().splitlines() if "it/s]" not in ln and "s/it]" not in ln]
        return {"argv": " ".join(argv)[:80], "code": proc.returncode, "seconds": round(seconds, 2),
                "traceback": "Traceback" in proc.stderr, "lines": len(lines), "changed": snapshot(world) != before,
                "message": lines[-1] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="out/cli_probe.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "world"
        template.mkdir()
        build_world(template)
        results = [run_case(template, argv, damage) for argv, damage, _ in CASES]
    ran = [r for r in results if "skipped" not in r]
    bad = [r for r in ran if r["traceback"] or r["code"] != 2 or r["lines"] != 1 or r["changed"]]
    times = [r["seconds"] for r in ran]
    summary = {"cases": len(ran), "skipped": len(results) - len(ran), "tracebacks": sum(r["traceback"] for r in ran),
               "exit_not_2": sum(r["code"] != 2 for r in ran), "not_one_line": sum(r["lines"] != 1 for r in ran),
               "files_changed": sum(r["changed"] for r in ran), "seconds_p50": statistics.median(times),
               "seconds_max": max(times), "over_2s": sum(t > 2 for t in times)}
    for r in bad:
        print(f"PROBLEM {r}")
    for key, value in summary.items():
        print(f"{key:>14}: {value}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
