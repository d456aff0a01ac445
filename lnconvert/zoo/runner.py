"""Running many models, each in its own subprocess with a time limit, into one table."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from .config import STATUSES, ZooOptions
from .render import markdown, read_rows, write_csv


def run_child(name: str, options: ZooOptions, running: set | None = None) -> dict[str, Any]:
    """Convert ``name`` in a fresh interpreter; a timeout, a kill or a crash becomes a failed row.
    The child is in ``running`` while it runs, so an interrupted parent can end it."""
    failed = {"model": name, "library": name.partition("/")[0], "status": "failed"}
    with tempfile.TemporaryDirectory(prefix="lnconvert-zoo-") as tmp:
        result_path = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "lnconvert.zoo", name, str(result_path), json.dumps(asdict(options))]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)  # Ctrl-C reaches the parent only; it ends the children
        if running is not None:
            running.add(process)
        try:
            _, stderr = process.communicate(timeout=options.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return failed | {"error_class": "Timeout", "reason": f"no result within {options.timeout:g} s"}
        finally:
            if running is not None:
                running.discard(process)
        if result_path.is_file():
            return json.loads(result_path.read_text())
    elapsed = time.perf_counter() - start
    if process.returncode < 0:
        import signal

        signame = signal.Signals(-process.returncode).name
        hint = " (out of memory?)" if signame == "SIGKILL" else ""
        return failed | {"error_class": "Killed", "reason": f"{signame} after {elapsed:.0f} s{hint}"}
    last = (stderr or "").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
    return failed | {"error_class": "Crashed", "reason": last[0][:300]}



def run_zoo(models: Sequence[str], options: ZooOptions, *, out: str | Path = "zoo-report", jobs: int = 1,
            rerun: bool = False, console=None) -> list[dict[str, Any]]:
    """Convert ``models`` (``library/name``), ``jobs`` subprocesses at a time, into ``out``.csv/.md.

    Models already in the CSV are skipped unless ``rerun``; the CSV and markdown are rewritten
    atomically after every model. Returns all rows (old and new) in CSV order.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    csv_path, md_path = Path(f"{out}.csv"), Path(f"{out}.md")
    rows = {r["model"]: r for r in read_rows(csv_path)}
    todo = [m for m in models if rerun or m not in rows]
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in STATUSES}

    def describe() -> str:
        return " ".join(f"{s} {n}" for s, n in counts.items())

    with Progress(TextColumn("zoo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        task = progress.add_task(describe(), total=len(todo))
        running: set[subprocess.Popen] = set()
        futures = {pool.submit(run_child, m, options, running): m for m in todo}
        try:
            for future in as_completed(futures):
                row = future.result()
                rows[row["model"]] = row
                counts[row["status"]] += 1
                write_csv(list(rows.values()), csv_path)
                md_path.write_text(markdown(list(rows.values()), options))
                progress.update(task, advance=1, description=f"{describe()} | last: {row['model']} {row['status']}")
        except BaseException:
            for future in futures:  # queued models never start
                future.cancel()
            for process in list(running):
                process.kill()
            raise
    if not todo:
        md_path.write_text(markdown(list(rows.values()), options))
    return list(rows.values())

