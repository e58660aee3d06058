"""Run a backend's probe in a short-lived child process, once per process.

A native binding can kill the process that calls it: a binary built for CPU
features this machine lacks dies with SIGILL (``liburing`` 2026.x on a CPU without
AVX-512), a bad one with SIGSEGV.  No ``except`` catches that, so the daemon never
runs a probe itself: :func:`run_probe` starts ``sys.executable`` on it, with core
dumps switched off (``RLIMIT_CORE`` 0 and ``PR_SET_DUMPABLE`` 0), and turns what
happened into ``None`` (usable) or one line saying why not.  The answer is cached
for the life of the process, per probe.

A probe is named ``"module:function"``.  The child loads that module from its file
without importing its package first (so probing ``aio._probe`` does not import
trio), then calls ``function(step)``, which returns ``None`` or a one-line reason.
Before each native step it calls ``step(subject, activity)``, e.g.
``step("liburing's binary", "creating a ring")``; if the child then dies by a
signal the reason reads ``liburing's binary crashed with SIGILL while creating a
ring (built for CPU features this machine lacks)``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading

__all__ = ["PROBE_TIMEOUT_S", "run_probe"]

#: a probe taking longer than this is killed and its backend reported unusable
PROBE_TIMEOUT_S = 30.0

#: what a signal that killed a probe usually means
_SIGNAL_MEANING = {
    signal.SIGILL: "built for CPU features this machine lacks",
    signal.SIGSEGV: "a memory fault in native code: a bug, or a binary built against another library version",
    signal.SIGBUS: "a memory fault in native code: a bug, or a binary built against another library version",
    signal.SIGABRT: "native code aborted",
    signal.SIGKILL: "killed from outside, perhaps by the out-of-memory killer",
}

#: the child: no core dump whatever it does, load the probe's module by file, report on stdout
_CHILD = r"""
import ctypes, importlib.util, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:  # PR_SET_DUMPABLE = 4: no core even through a core_pattern pipe (systemd-coredump)
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
except (OSError, AttributeError):
    pass
name, path, function = sys.argv[1:4]

def step(subject, activity):
    sys.stdout.write("step " + subject + "\t" + activity + "\n")
    sys.stdout.flush()

spec = importlib.util.spec_from_file_location(name, path)
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
why = getattr(module, function)(step)
sys.stdout.write("ok\n" if why is None else "unavailable " + " ".join(str(why).split()) + "\n")
"""

_cache: dict[str, str | None] = {}
_lock = threading.Lock()


def run_probe(spec: str, *, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` if the probe ``spec`` (``"module:function"``) finds its backend usable,
    else one line saying why not.  Runs it in a child process the first time, then
    answers from the cache."""
    with _lock:
        if spec not in _cache:
            _cache[spec] = _run_child(spec, timeout)
        return _cache[spec]


def _locate(spec: str) -> tuple[str, str, str] | str:
    """(module name, its file, function name), or a reason why ``spec`` cannot be run."""
    module, _, function = spec.partition(":")
    if not module or not function:
        return f"probe {spec!r} is not of the form module:function"
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"probe module {module!r} cannot be found: {exc}"
    if found is None or not found.origin or not os.path.isfile(found.origin):
        return f"probe module {module!r} cannot be found as a source file"
    return module, found.origin, function


def _package_root(module: str, path: str) -> str:
    """The directory that must be on ``sys.path`` for ``module`` (at ``path``) to import."""
    root = os.path.dirname(os.path.abspath(path))
    for _ in range(module.count(".")):
        root = os.path.dirname(root)
    return root


def _run_child(spec: str, timeout: float) -> str | None:
    located = _locate(spec)
    if isinstance(located, str):
        return located
    module, path, function = located
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)  # its dump would only say what the reason says
    root = _package_root(module, path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, module, path, function],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            env=env, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return f"the probe {spec} did not finish within {timeout:g} s and was killed"
    except OSError as exc:
        return f"the probe process for {spec} could not be started: {exc}"
    return interpret(spec, proc.returncode, proc.stdout, proc.stderr)


def interpret(spec: str, returncode: int, stdout: str, stderr: str) -> str | None:
    """Turn a finished probe child's exit status and output into ``None`` or one line."""
    subject, activity = f"the probe process for {spec}", "starting"
    result: str | None = None
    for line in stdout.splitlines():
        if line.startswith("step "):
            subject, _, activity = line[5:].partition("\t")
        elif line == "ok" or line.startswith("unavailable "):
            result = line
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            name, meaning = sig.name, _SIGNAL_MEANING.get(sig)
        except ValueError:
            name, meaning = f"signal {-returncode}", None
        return f"{subject} crashed with {name} while {activity}" + (f" ({meaning})" if meaning else "")
    if returncode == 0 and result is not None:
        return None if result == "ok" else result[len("unavailable "):]
    errors = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = errors[-1] if errors else "no output"
    return f"the probe {spec} failed (exit status {returncode}) while {activity}: {last}"
