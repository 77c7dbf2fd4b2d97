"""The check's results: one Item per check, run under a time limit so that a failure or a hang of one
never stops the ones after it, and written to the JSON file after every item (a run killed from
outside still leaves what it measured)."""
from __future__ import annotations

import json
import resource
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# pass/fail: a correctness check; figure: a measurement (speed, memory, environment);
# absent: the feature it checks is not in this checkout; skipped: it could not run here (the
# detail says why).
STATUSES = ("pass", "fail", "figure", "absent", "skipped")
KINDS = ("environment", "correctness", "speed", "server")
SCHEMA = "glm-gpu-check/1"


@dataclass
class Item:
    name: str
    kind: str
    status: str = "skipped"
    detail: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process and its finished children: wall time means little on a busy box


def cpu_time() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Skip(Exception):
    """Raised by a check that cannot run here; the message says why."""


class Absent(Exception):
    """Raised by a check whose feature this checkout does not have yet."""


class ItemTimeout(BaseException):
    """A BaseException, as KeyboardInterrupt: the engine's per-sequence containment and Triton's
    interpreter catch Exception, and a time limit must get through both."""


class _Clock:
    armed = False
    expired = False


def _alarm(signum, frame):
    if _Clock.armed:
        _Clock.expired = True
        raise ItemTimeout()


def run_item(name: str, kind: str, check: Callable[[], tuple[str, str, dict] | dict], limit_s: float) -> Item:
    """Run one check with a wall-clock limit (SIGALRM: it interrupts Python code, including the
    Triton interpreter, but not one long native call, which the run's overall deadline covers).
    The alarm repeats every second once the limit is reached, in case the check swallows even that.

    A check returns figures (a dict: status "figure"), or (status, detail, figures)."""
    item = Item(name, kind)
    old = signal.signal(signal.SIGALRM, _alarm)
    _Clock.armed, _Clock.expired = True, False
    signal.setitimer(signal.ITIMER_REAL, limit_s, 1.0)
    t, cpu = time.perf_counter(), cpu_time()
    try:
        result = check()
        if isinstance(result, dict):
            item.status, item.figures = "figure", result
        else:
            item.status, item.detail, item.figures = result
    except ItemTimeout:
        item.status, item.detail = "fail", f"timed out after {limit_s:.0f}s"
    except Skip as e:
        item.status, item.detail = "skipped", str(e)
    except Absent as e:
        item.status, item.detail = "absent", str(e)
    except Exception as e:  # noqa: BLE001 -- any failure is this item's result, never the run's end
        tb = traceback.extract_tb(e.__traceback__)
        where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        item.status, item.detail = "fail", f"{type(e).__name__}: {e}{where}"[:2000]
    finally:
        _Clock.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if _Clock.expired:  # also when the timeout surfaced wrapped (Triton's InterpreterError, a failed request)
        item.status, item.detail = "fail", f"timed out after {limit_s:.0f}s"
    item.seconds = round(time.perf_counter() - t, 2)
    item.cpu_seconds = round(cpu_time() - cpu, 2)
    assert item.status in STATUSES, item.status
    return item


@dataclass
class Report:
    path: Path
    meta: dict
    items: list[Item] = field(default_factory=list)

    def add(self, item: Item) -> Item:
        self.items.append(item)
        self.write()
        return item

    @property
    def ok(self) -> bool:
        """Every correctness item passed (absent: the feature is not there to check) and nothing failed."""
        return all(i.status in ("pass", "absent") for i in self.items if i.kind == "correctness") \
            and not any(i.status == "fail" for i in self.items)

    def to_json(self) -> dict:
        counts = {s: sum(i.status == s for i in self.items) for s in STATUSES}
        return {"schema": SCHEMA, **self.meta, "ok": self.ok, "counts": counts,
                "items": [asdict(i) for i in self.items]}

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        tmp.replace(self.path)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def line(item: Item) -> str:
    """One item for the human summary: status, name, time, detail."""
    detail = f"  {item.detail}" if item.detail else ""
    return f"{item.status.upper():7} {item.kind[:11]:11} {item.name:30} {item.seconds:6.1f}s{detail}"


def figures_lines(item: Item) -> list[str]:
    return [f"{'':8}{'':12}  {k} = {_short(v)}" for k, v in item.figures.items()]


def summary(report: Report) -> str:
    out = []
    for item in report.items:
        out.append(line(item))
        if item.status in ("figure", "pass") and item.figures:
            out.extend(figures_lines(item))
    counts = report.to_json()["counts"]
    out.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    verdict = "every correctness item passed" if report.ok else "NOT OK: see the FAIL / SKIPPED correctness items above"
    out.append(f"{verdict}; JSON: {report.path}")
    return "\n".join(out)
