"""``make mutate``: mutation testing (cosmic-ray) of the code where a wrong answer
costs guest memory, each part against its own targeted tests (docs/TESTING.md).

    python mutation/run.py [TARGET ...] [--jobs N] [--sample N] [--survivors-only] [--workdir DIR]

cosmic-ray mutates files in place, so each target runs in its own copy of the
tree (``git ls-files``: tracked and untracked-not-ignored files) under the work
directory (default ``.mutate/``), with ``PYTHONPATH`` set to that copy (the
project's editable install would otherwise import the original); the tests'
subprocesses (``python -m cli restore ...``) inherit it.  A target is a set of
modules, optionally only some of their functions (so that a module shared with
code under work elsewhere is mutated only where its target asks), plus the tests
run for each mutant; they must pass on the unmutated copy first (else every mutant
would count as killed).  ``--sample N`` runs a random N mutants of each target
(seeded) instead of all of them, for a quicker estimate.  ``--survivors-only`` runs
again only the survivors of the last run in the work directory (once tests were
added for them) and carries its other results over; it is refused where a mutated
module changed since that run.

Writes ``WORKDIR/report.md``: per target the counts (killed, timeouts counted as
killed, survived, incompetent), the score, and every survivor not listed in
``mutation/equivalent.txt`` (module, function, line, operator, the mutated line).
Exit 0 always once the runs finished: the score is a report, not a gate.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import os
import random
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = "python -m pytest -x -q -p no:cacheprovider -p no:randomly"

#: the "sufficient" operator set (Offutt et al.): each arithmetic and comparison
#: operator replaced by its inverse and its boundary, not by all eleven others
_KEEP_BINARY = ["Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Mul", "Mod_FloorDiv",
                "BitOr_BitAnd", "BitAnd_BitOr", "BitXor_BitOr", "LShift_RShift", "RShift_LShift", "Pow_Mul"]
_KEEP_COMPARE = ["Eq_NotEq", "NotEq_Eq", "Lt_GtE", "Lt_LtE", "LtE_Gt", "LtE_Lt", "Gt_LtE", "Gt_GtE",
                 "GtE_Lt", "GtE_Gt", "Is_IsNot", "IsNot_Is"]
EXCLUDE_OPERATORS = [
    "core/ReplaceBinaryOperator_(?!(" + "|".join(_KEEP_BINARY) + ")$)",
    "core/ReplaceComparisonOperator_(?!(" + "|".join(_KEEP_COMPARE) + ")$)",
    "core/ReplaceUnaryOperator_(?!(USub_UAdd|Delete_Not)$)",
    "core/VariableInserter", "core/VariableReplacer", "core/RemoveDecorator",
]


@dataclass
class Target:
    name: str
    modules: list[str]
    tests: list[str]
    #: only mutations inside these functions ("Class.method" or "function"); None: all
    functions: dict[str, list[str]] | None = None
    timeout: float = 60.0
    extra: str = ""  #: more pytest arguments (-k ...)
    #: a test running longer than this many seconds fails the run (pytest-timeout), so a
    #: mutant that makes one test hang costs this, not the whole ``timeout``; None: off
    test_timeout: float | None = None


#: the loader target's functions, by module (every module listed: one without a list
#: would be mutated whole)
_LOADER = {
    "loader/core/_loader.py": ["Loader.shutdown", "Loader.aclose", "Loader.wait_loaded", "Loader.submit_wait"],
    "loader/core/_settle.py": ["Settler.finish_waiter", "Settler.drop_waiter", "Settler.answer_all",
                               "Settler.block", "Settler.settle"],
    "loader/core/_verify.py": ["Verifier.verify_now", "Verifier.land", "Verifier._chunks_complete",
                               "Verifier.checked"],
    "loader/core/_reads.py": ["Reads.complete"],
    "loader/core/_schedule.py": ["Scheduler._wants_turn", "Scheduler.enqueue"],
    "loader/core/_config.py": ["LoaderConfig.__post_init__"],
}

TARGETS = [
    Target("protocol", ["protocol"], ["tests/test_protocol.py", "tests/test_protocol_fast.py"], timeout=30),
    # the command line to the daemon's options in-process first (most mutants die there in
    # a second), then the refusals and exit codes through the command line, socket
    # activation, and the options reaching a real daemon
    Target("restore-cli", ["cli/_restore.py"],
           ["tests/test_restore_options.py", "tests/test_faults_startup.py", "tests/test_ops.py",
            "tests/test_restore_cli.py"], timeout=120,
           extra="-k 'test_restore_options or test_restore_cli or bad_options or missing_socket or ready_fd "
                 "or directory_without_index or socket_activation'"),
    # the ioctl layer, against a real userfaultfd in the test process (a second or two)
    Target("uffd", ["loader/uffd/_ioctl.py"], ["tests/test_uffd_abi.py", "tests/test_uffd_ioctl.py"], timeout=60),
    # the loader's waits, completion, checksums and shutdown (the chunks verified at once or
    # after they land: verify_now, land, _chunks_complete, checked), across the parts of
    # loader/core that hold them; not its range bookkeeping (_rangeset.py, _layout.py, the
    # window), which has tests of its own.
    # The quickest tests first (-x stops at the first failure); left out: the daemon
    # processes and the tests of other code (checkpoint format, hashing, the extent scan)
    Target("loader", [*_LOADER],
           ["tests/test_loader_edges.py", "tests/test_scheduler.py", "tests/test_faults_loader.py",
            "tests/test_verify.py", "tests/test_scale.py"],
           extra="-p no:xdist -k 'not sigterm and not by_a_daemon and not fiemap and not million and not "
                 "scattered_sample and not check_finds_the_same and not new_checkpoints and not opens_verifies "
                 "and not gaps_are and not o_direct and not hugetlbfs'",
           functions=_LOADER, timeout=60, test_timeout=5),
    # checksum verification: which chunks a read completes, hashing them (scattered or
    # not, the GIL let go or not) and comparing with the index's sums
    Target("checksums", ["loader/core/_chunks.py"],
           ["tests/test_loader_edges.py", "tests/test_verify.py", "tests/test_faults_loader.py",
            "tests/test_scale.py"],
           extra="-p no:xdist -k 'not sigterm and not by_a_daemon and not new_checkpoints and not opens_verifies "
                 "and not o_direct and not hugetlbfs and not fiemap and not million and not scattered_sample'",
           functions={"loader/core/_chunks.py": [
               "_c_xxh3", "_Chunks.landed", "_Chunks._take", "_Chunks.matches", "_Chunks.check",
               "_Chunks.file_spans", "_Chunks.memory_spans", "_Chunks.chunk_range"]},
           timeout=60, test_timeout=5),
    # the fault answering code of the page-fault handler, driven in the test process (a
    # few seconds; test_uffd.py and test_uffd_failures.py serve a VMM end to end)
    Target("uffd-handler", ["loader/uffd/_faults.py", "loader/uffd/_answer.py", "loader/uffd/_handler.py"],
           ["tests/test_uffd_answer.py", "tests/test_uffd_answers.py"],
           functions={"loader/uffd/_faults.py": ["Decisions._fault", "Decisions._answer", "Decisions._zero",
                                                 "Decisions._fail", "Decisions._copy"],
                      "loader/uffd/_answer.py": ["Answerer.copy", "Answerer.zero", "Answerer.continue_",
                                                 "Answerer.poison", "Answerer.wake", "Answerer._failed",
                                                 "Answerer.vanished"],
                      "loader/uffd/_handler.py": ["UffdHandler._on_waited"]},
           timeout=60),
]


@dataclass
class Outcome:
    target: str
    killed: int = 0
    timeouts: int = 0
    survived: list[dict] = field(default_factory=list)
    incompetent: int = 0
    equivalent: list[dict] = field(default_factory=list)
    skipped: int = 0
    error: str = ""
    baseline_s: float = 0.0  #: the tests' time on the unmutated code
    carried: int = 0  #: results taken from the earlier run (--survivors-only)
    seconds: float = 0.0  #: the target's whole run


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in files:
        if not name:
            continue
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            out = dest / os.fsdecode(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)


def function_spans(path: Path, names: list[str]) -> list[tuple[int, int]]:
    """(first, last) lines of the named functions in ``path``."""
    tree = ast.parse(path.read_text())
    spans = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if f"{prefix}{child.name}" in names:
                    spans.append((child.lineno, child.end_lineno or child.lineno))
    visit(tree, "")
    found = len(spans)
    if found < len(names):
        print(f"mutate: {path}: only {found} of {len(names)} functions found", file=sys.stderr)
    return spans


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where ``path``'s type annotations are: with ``from __future__ import annotations``
    they are never evaluated, so a mutant there (``int | None`` -> ``int & None``) is
    equivalent by construction and is not run."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        notes: list[ast.expr | None] = []
        if isinstance(node, ast.arg):
            notes.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            notes.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            notes.append(node.annotation)
        for a in notes:
            if a is not None:
                spans.append(((a.lineno, a.col_offset), (a.end_lineno or a.lineno, a.end_col_offset or 0)))
    return spans


def enclosing(path: Path, line: int) -> str:
    tree = ast.parse(path.read_text())
    best = ""

    def visit(node: ast.AST, prefix: str) -> None:
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.lineno <= line <= (child.end_lineno or child.lineno):
                    best = f"{prefix}{child.name}"
                    visit(child, f"{prefix}{child.name}.")
    visit(tree, "")
    return best or "<module>"


def load_equivalents() -> set[tuple[str, str, str]]:
    """(module, operator, mutated line stripped) of mutants judged equivalent."""
    path = ROOT / "mutation" / "equivalent.txt"
    out = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            module, operator, code = line.split(" | ", 2)[:3]
            out.add((module.strip(), operator.strip(), code.split(" # ")[0].strip()))
    return out


def module_files(root: Path, modules: list[str]) -> dict[str, bytes]:
    """The text of each source file of ``modules`` (files or packages) under ``root``."""
    out = {}
    for m in modules:
        files = [root / m] if m.endswith(".py") else sorted((root / m).rglob("*.py"))
        for f in files:
            out[str(f.relative_to(root))] = f.read_bytes() if f.exists() else b""
    return out


def run_target(t: Target, workdir: Path, sample: int | None, seed: int, survivors_only: bool = False) -> Outcome:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    tree = workdir / t.name / "tree"
    session = workdir / t.name / "session.sqlite"
    previous = workdir / t.name / "previous.sqlite"
    if survivors_only:
        # the last run's results stand for every mutant but its survivors, which run again
        # against today's tests: only where the mutated code is byte for byte the same
        if not session.exists() or not tree.exists():
            raise RuntimeError(f"no earlier run of {t.name} in {workdir} to take the survivors of")
        if module_files(tree, t.modules) != module_files(ROOT, t.modules):
            raise RuntimeError(f"{', '.join(t.modules)} changed since the earlier run: run every mutant")
        shutil.copy2(session, previous)
    copy_tree(tree)
    session.unlink(missing_ok=True)
    config = workdir / t.name / "config.toml"
    module_path = t.modules[0] if len(t.modules) == 1 else t.modules
    command = test_command(t)
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {module_path!r}\n".replace("'", '"')
        + f"timeout = {t.timeout}\nexcluded-modules = []\n"
        f"test-command = \"{command}\"\n\n"
        "[cosmic-ray.distributor]\nname = \"local\"\n\n"
        "[cosmic-ray.filters.operators-filter]\nexclude-operators = ["
        + ", ".join(repr(e).replace("'", '"') for e in EXCLUDE_OPERATORS) + "]\n")
    bindir = Path(sys.executable).parent
    # "python" in the test command is this one (the project's virtual environment)
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1",
               PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    # the tests must pass on the unmutated copy, or every mutant would count as killed
    started = time.monotonic()
    baseline = subprocess.run(shlex.split(command), cwd=tree, env=env, capture_output=True, text=True)
    if baseline.returncode != 0:
        tail = (baseline.stdout + baseline.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"the tests fail on the unmutated code: {' / '.join(tail)}")
    baseline_s = time.monotonic() - started
    subprocess.run([bindir / "cosmic-ray", "init", config, session], cwd=tree, env=env, check=True)
    # EXCLUDE_OPERATORS applied as cr-filter-operators does (the same pattern), in the one
    # transaction below: the tool writes one per mutant (minutes for a large module)
    excluded = re.compile("|".join(f"(:?{e})" for e in EXCLUDE_OPERATORS))
    keep_lines: dict[str, list[tuple[int, int]]] = {}
    if t.functions:
        keep_lines = {m: function_spans(tree / m, names) for m, names in t.functions.items()}
    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = list(db.pending_work_items)
        rng = random.Random(seed)
        chosen = {item.job_id for item in pending}
        notes = {m: annotation_spans(tree / m) for m in {str(i.mutations[0].module_path) for i in pending}}

        def inside(item) -> bool:
            m = item.mutations[0]
            if any(excluded.match(x.operator_name) for x in item.mutations):
                return False
            pos = tuple(m.start_pos)
            if any(a <= pos < b for a, b in notes[str(m.module_path)]):
                return False  # an annotation: equivalent
            spans = keep_lines.get(str(m.module_path))
            return spans is None or any(a <= m.start_pos[0] <= b for a, b in spans)
        chosen = {item.job_id for item in pending if inside(item)}
        if sample is not None and len(chosen) > sample:
            chosen = set(rng.sample(sorted(chosen), sample))
        carried: set[str] = set()
        if survivors_only:
            def key(item) -> tuple[str, str, int]:
                m = item.mutations[0]
                return str(m.module_path), m.operator_name, m.occurrence
            with use_db(str(previous), WorkDB.Mode.open) as old:
                before = {key(item): result for item, result in old.completed_work_items}
            for item in pending:
                result = before.get(key(item))
                if item.job_id not in chosen:
                    continue
                if result is None or result.worker_outcome == WorkerOutcome.SKIPPED:
                    raise RuntimeError(f"{key(item)} was not run in the earlier run: run every mutant")
                if result.worker_outcome == WorkerOutcome.NORMAL and result.test_outcome == TestOutcome.SURVIVED:
                    continue  # runs again
                db.set_result(item.job_id, result)
                chosen.discard(item.job_id)
                carried.add(item.job_id)
        # (one transaction: one each took minutes for a module of thousands of mutants)
        db.set_multiple_results([item.job_id for item in pending
                                 if item.job_id not in chosen and item.job_id not in carried],
                                WorkResult(output="not in this run", worker_outcome=WorkerOutcome.SKIPPED))
    print(f"mutate: {t.name}: {len(chosen)} mutants"
          + (f" (the earlier run's survivors; {len(carried)} results carried over)" if survivors_only else "")
          + f", tests {' '.join(t.tests)} ({baseline_s:.1f} s unmutated)", flush=True)
    subprocess.run([bindir / "cosmic-ray", "exec", config, session], cwd=tree, env=env, check=True)
    # the tree is left mutated by nothing: cosmic-ray restores each file after its test
    out = collect(t, tree, session)
    out.baseline_s, out.seconds, out.carried = baseline_s, time.monotonic() - started, len(carried)
    return out


def test_command(t: Target) -> str:
    limit = f" --timeout {t.test_timeout:g} --timeout-method thread" if t.test_timeout else ""
    return f"{PYTEST}{limit} {' '.join(t.tests)} {t.extra}".rstrip()


def collect(t: Target, tree: Path, session: Path) -> Outcome:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    _ABNORMAL = {o for o in (getattr(WorkerOutcome, "TIMEOUT", None), WorkerOutcome.ABNORMAL) if o is not None}

    equivalents = load_equivalents()
    out = Outcome(t.name)
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                out.skipped += 1
                continue
            # a test run that hung past the timeout or died: cosmic-ray 8.7 has no TIMEOUT
            # outcome (it reports ABNORMAL); either way the mutant did not pass the tests
            if result.worker_outcome in _ABNORMAL:
                out.timeouts += 1
                continue
            if result.test_outcome == TestOutcome.KILLED:
                out.killed += 1
                continue
            if result.test_outcome == TestOutcome.INCOMPETENT:
                out.incompetent += 1
                continue
            m = item.mutations[0]
            line = m.start_pos[0]
            mutated = _mutated_line(result.diff or "")
            module = str(m.module_path)
            entry = {"module": module, "line": line, "operator": m.operator_name,
                     "function": enclosing(tree / module, line), "code": mutated,
                     "original": (tree / module).read_text().splitlines()[line - 1].strip()}
            # (a line's own comment is cut off both here and in equivalent.txt, whose reasons follow ' # ')
            if (module, m.operator_name, mutated.split(" # ")[0].strip()) in equivalents:
                out.equivalent.append(entry)
            else:
                out.survived.append(entry)
    return out


def _mutated_line(diff: str) -> str:
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def report(outcomes: list[Outcome], sample: int | None, cpu_minutes: float = 0.0) -> str:
    lines = ["# Mutation run", "",
             f"{'a sample of ' + str(sample) + ' mutants per target' if sample else 'every mutant'}; "
             "score = killed (timeouts included) / (run - incompetent - equivalent)", "",
             "| target | run | killed | timeouts | survived | equivalent | incompetent | score | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        run = o.killed + o.timeouts + len(o.survived) + len(o.equivalent) + o.incompetent
        counted = run - o.incompetent - len(o.equivalent)
        score = f"{100 * (o.killed + o.timeouts) / counted:.1f}%" if counted else "-"
        lines.append(f"| {o.target} | {run} | {o.killed} | {o.timeouts} | {len(o.survived)} | "
                     f"{len(o.equivalent)} | {o.incompetent} | {score} | {o.seconds / 60:.0f} |"
                     + (f" error: {o.error}" if o.error else ""))
    lines += ["", f"CPU time of the runs (user + system, every process): {cpu_minutes:.0f} min"]
    for o in outcomes:
        if o.carried:
            lines.append(f"- {o.target}: only the earlier run's survivors ran again; {o.carried} results "
                         "(killed, timeouts, incompetent) are carried over from it (the same code)")
    for o in outcomes:
        if o.survived:
            lines += ["", f"## Survivors: {o.target}", ""]
            for s in sorted(o.survived, key=lambda s: (s["module"], s["line"])):
                lines.append(f"- `{s['module']}:{s['line']}` {s['function']} {s['operator']}: "
                             f"`{s['original']}` -> `{s['code']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", help=f"default: all of {', '.join(t.name for t in TARGETS)}")
    p.add_argument("--jobs", type=int, default=2, help="targets run at once, each in its own tree (default 2)")
    p.add_argument("--sample", type=int, help="run a random N mutants per target")
    p.add_argument("--survivors-only", "--rerun-survivors", action="store_true",
                   help="run again only the survivors of the last run in WORKDIR (after tests were added); "
                        "its other results are carried over; refused if the mutated modules changed since")
    p.add_argument("--seed", type=int, default=25)
    p.add_argument("--workdir", default=str(ROOT / ".mutate"))
    args = p.parse_args(argv)
    by_name = {t.name: t for t in TARGETS}
    unknown = [n for n in args.targets if n not in by_name]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}")
    chosen = [by_name[n] for n in args.targets] or TARGETS
    workdir = Path(args.workdir).resolve()  # (the runs work in the copied tree)
    workdir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    if args.survivors_only and args.sample is not None:
        p.error("--survivors-only runs the survivors of a whole run: not with --sample")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_target, t, workdir, args.sample, args.seed, args.survivors_only): t
                   for t in chosen}
        for f in concurrent.futures.as_completed(futures):
            t = futures[f]
            try:
                outcomes.append(f.result())
            except Exception as exc:  # one target's failure must not lose the others' results
                outcomes.append(Outcome(t.name, error=str(exc)))
    outcomes.sort(key=lambda o: [t.name for t in TARGETS].index(o.target))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = report(outcomes, args.sample, (cpu.ru_utime + cpu.ru_stime - cpu_before) / 60)
    (workdir / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
