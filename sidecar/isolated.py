"""Load a policy for a reload without stalling the Checks being served meanwhile.

Parsing YAML with libyaml holds the GIL for seconds on a large policy (a 40,000-rule file stalls
every Check for over a second), and a full garbage collection over a large heap pauses the
process for hundreds of milliseconds. So a reload:

1. parses, validates and compiles the file in a child process (`python -m sidecar.isolated
   FILE`), which reports every problem with its file, line and column, or writes the validated
   document as JSON, one line per rule;
2. reads those lines back in the serving process, each a small `json.loads`, and compiles them
   (`compiler.load_policy_data`, against the serving process's key store): Python code that
   lets the GIL go every switch interval;
3. keeps the cyclic garbage collector's automatic passes off meanwhile and freezes the new
   policy out of its reach slice by slice (`gc.freeze`, see `_gc_paused`), so no collection
   ever walks the policy's millions of objects, and the Checks' own garbage is still freed.
   Compiled policies hold no reference cycles, so a replaced one is freed by reference counting.

The start-up load stays in-process (nothing is served yet).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

# (No imports of the parser or the compiler here: where they are used. The start-up load starts
# the child before it imports them, and the child, `python -m sidecar.isolated`, needs only the
# parser.)
if TYPE_CHECKING:
    from sidecar.keys import KeyStore
    from sidecar.policy import Policy
    from sidecar.policyfile import Problem

CHILD_TIMEOUT = 300.0  # seconds; a policy that takes longer to validate is refused
_GC_LOCK = threading.Lock()


def load_isolated(
    path: str | Path,
    *,
    keys: KeyStore | None = None,
    allow_insecure_jwks_http: bool = False,
    python: str = sys.executable,
    compile_in_child: bool = True,
) -> Policy:
    """Like `compiler.load_policy` (but not primed: the caller primes against `keys`), for a
    process that is serving: see the module docstring.
    Call it from a worker thread (it blocks). Raises PolicyError listing every problem.
    `compile_in_child=False` (start-up, where nothing is served yet) has the child only parse
    and check the schema; compile problems are then found here, located by path only."""
    child = Validator(
        path,
        allow_insecure_jwks_http=allow_insecure_jwks_http,
        python=python,
        compile_in_child=compile_in_child,
    )
    return child.policy(keys)


class Validator:
    """The child process of `load_isolated`, started at once: the caller may do other work while
    it parses (the start-up load imports the serving modules meanwhile), then takes `policy()`."""

    def __init__(
        self,
        path: str | Path,
        *,
        allow_insecure_jwks_http: bool = False,
        python: str = sys.executable,
        compile_in_child: bool = True,
    ) -> None:
        self.path = path = Path(path)
        self.insecure = allow_insecure_jwks_http
        # -P: the package installed with this interpreter, never a `sidecar/` in the working
        # directory (which `python -m` would otherwise put first on the path).
        argv = [python, "-P", "-m", "sidecar.isolated", str(path)]
        if not compile_in_child:
            argv.append("--parse-only")
        if allow_insecure_jwks_http:
            argv.append("--allow-insecure-jwks-http")
        self.error = ""  # why there is no child
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            self.error = f"cannot start the policy validator: {e}"
            return
        assert proc.stdout is not None and proc.stderr is not None
        self.stderr: list[bytes] = []
        self.drain = threading.Thread(target=lambda: self.stderr.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        self.drain.start()
        self.timer = threading.Timer(CHILD_TIMEOUT, proc.kill)
        self.timer.daemon = True  # (never what keeps a process from exiting)
        self.timer.start()

    def policy(self, keys: KeyStore | None = None) -> Policy:
        """The compiled policy (not primed), once the child is done. Raises PolicyError."""
        from sidecar.compiler import load_policy_data
        from sidecar.keys import KeyStore
        from sidecar.policyfile import PolicyError, Problem

        proc, path = self.proc, self.path
        if proc is None:
            raise PolicyError([Problem(str(path), 1, 1, "", self.error)])
        assert proc.stdout is not None and proc.stderr is not None
        stderr, drain = self.stderr, self.drain
        try:
            with _gc_paused():
                head, lines = _read(proc.stdout)
                if head.get("ok") is not True:
                    problems = [Problem(**p) for p in head.get("problems", [])]
                    raise PolicyError(problems or [_failed(path, proc, stderr, drain)])
                data = _assemble(head["document"], lines)
                if proc.wait() != 0:
                    raise PolicyError([_failed(path, proc, stderr, drain)])
                policy = load_policy_data(
                    data,
                    file=str(path),
                    base_dir=path.parent,
                    digest=head["digest"],
                    keys=keys if keys is not None else KeyStore(),
                    allow_insecure_jwks_http=self.insecure,
                )
                del data, lines
                return policy
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            # The child's output is not what it should be.
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise PolicyError([Problem(str(path), 1, 1, "", f"the policy validator failed: {why}")]) from None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child (if still running) and release its pipes. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        self.error = "the policy validator was closed"
        self.timer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.drain.join(5)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def file_stamp(file: str) -> tuple[Any, ...]:
    """What identifies a file's contents cheaply (the reload watcher compares these): its real
    path, modification time, size and inode."""
    try:
        real = os.path.realpath(file)
        st = os.stat(real)
        return (real, st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return (str(file), "missing")


def settle(policy: Policy, *, collect: bool = False) -> None:
    """After a policy starts serving: move everything alive now out of the cyclic GC's reach
    (see the module docstring). Also right after the start-up load. `collect`: free the garbage
    first (after a reload, when only what is not frozen yet would be walked; not after the
    start-up load, whose whole policy is still young)."""
    with _GC_LOCK:
        if collect:
            gc.collect()
        gc.freeze()


def retire(box: list[Policy], grace: float = 2.0) -> bool:
    """Free a replaced policy, handed over as the only item of `box`, without a long pause (call
    from a worker thread; it sleeps). After `grace` seconds no Check decides under it any more
    (they take milliseconds); if something still holds it, reference counting frees it later as
    usual. Returns whether it was dismantled."""
    time.sleep(grace)
    policy = box.pop()
    if sys.getrefcount(policy) > 2:  # this frame's name and getrefcount's own argument
        return False
    policy.tables.dismantle()
    for shadow in policy.shadows:  # their index of every rule
        shadow.policy.tables.dismantle()
    return True


GC_SLICE = 0.05  # seconds between the young-generation sorts while a policy is compiled


def _sort_young() -> None:
    """Free the cyclic garbage among what was allocated since the last call, then freeze what
    survived. Only the youngest generation is walked: a slice of the policy being compiled plus
    whatever the Checks served meanwhile left behind (grpc aio leaves five objects in a cycle per
    call), a few milliseconds' worth."""
    with _GC_LOCK:
        gc.collect(0)
        gc.freeze()


class _gc_paused:  # a context manager
    """The cyclic GC's automatic collections off while a policy is read and compiled (a full
    pass over the growing heap would stall every Check), back to their previous state after.

    Freezing the whole heap at the end would also freeze, for good, the cyclic garbage that the
    Checks served during the reload left behind (a leak per reload, red-team F4). So the heap is
    collected once at the start (only what is not frozen yet: small), and every GC_SLICE seconds
    meanwhile the young generation is sorted (`_sort_young`): its garbage freed, its survivors
    frozen. No pause is longer than one slice's allocations take to walk, and turning the
    collector on again costs no full pass."""

    def __enter__(self) -> None:
        with _GC_LOCK:
            self._was = gc.isenabled()
            gc.disable()
            gc.collect()  # before anything is frozen: the garbage of the time since the last load
        self._stop = threading.Event()
        self._slicer = threading.Thread(target=self._slices, name="gc-slices", daemon=True)
        self._slicer.start()

    def _slices(self) -> None:
        while not self._stop.wait(GC_SLICE):
            _sort_young()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._slicer.join()
        _sort_young()
        with _GC_LOCK:
            if self._was:
                gc.enable()


def _read(stream: IO[bytes]) -> tuple[dict[str, Any], Iterator[bytes]]:
    first = stream.readline()
    if not first:
        return {}, iter(())
    head = json.loads(first)
    if not isinstance(head, dict):
        raise ValueError("no header line")
    return head, iter(stream.readline, b"")


def _assemble(document: dict[str, Any], lines: Iterator[bytes]) -> dict[str, Any]:
    """The document with its rule lists filled from the lines (`["s"|"p", rule]` each, or
    `["S"|"P", [rule, ...]]`: a whole table)."""
    sens: list[Any] = []
    perms: list[Any] = []
    for line in lines:
        kind, rule = json.loads(line)
        if kind in ("S", "P"):
            (sens if kind == "S" else perms).extend(rule)
        else:
            (sens if kind == "s" else perms).append(rule)
    document["sensitivity"]["rules"] = sens
    document["permissions"] = perms
    return document


def _failed(
    path: Path, proc: subprocess.Popen[bytes], stderr: list[bytes], drain: threading.Thread
) -> Problem:
    from sidecar.policyfile import Problem

    proc.wait()
    drain.join(5)
    tail = " | ".join(b"".join(stderr).decode(errors="replace").strip().splitlines()[-3:])
    return Problem(str(path), 1, 1, "", f"the policy validator exited with {proc.returncode}: {tail}")


def _child(argv: list[str], out: IO[bytes]) -> int:
    from sidecar.policyfile import PolicyError, content_digest, parse_text

    gc.disable()  # a short-lived process: collecting its growing heap would only cost time
    path = Path(argv[0])
    insecure = "--allow-insecure-jwks-http" in argv[1:]
    try:
        text = path.read_text(encoding="utf-8")
        doc = parse_text(text, str(path))
        if "--parse-only" not in argv[1:]:
            from sidecar.compiler import compile_document
            from sidecar.keys import KeyStore

            # Compiled to find every problem; a key store of its own that fetches nothing.
            compile_document(
                doc, base_dir=path.parent, digest="", keys=KeyStore(), allow_insecure_jwks_http=insecure
            )
        data: dict[str, Any] = doc.data
    except PolicyError as e:
        problems = [
            {"file": p.file, "line": p.line, "column": p.column, "where": p.where, "message": p.message}
            for p in e.problems
        ]
        out.write(json.dumps({"ok": False, "problems": problems}).encode() + b"\n")
        return 0
    except (OSError, UnicodeDecodeError) as e:
        problem = {"file": str(path), "line": 1, "column": 1, "where": "", "message": f"cannot read: {e}"}
        out.write(json.dumps({"ok": False, "problems": [problem]}).encode() + b"\n")
        return 0
    sens = data["sensitivity"].pop("rules")
    perms = data.pop("permissions")
    digest = content_digest(text)
    write: Callable[[bytes], Any] = out.write
    write(json.dumps({"ok": True, "digest": digest, "document": data}).encode() + b"\n")
    if "--parse-only" in argv[1:]:
        # The start-up load (nothing is served yet): each table as one line, a quarter of the
        # time of a line per rule to write and to read.
        write(json.dumps(["S", sens], separators=(",", ":")).encode() + b"\n")
        write(json.dumps(["P", perms], separators=(",", ":")).encode() + b"\n")
    else:
        for rule in sens:
            write(json.dumps(["s", rule], separators=(",", ":")).encode() + b"\n")
        for rule in perms:
            write(json.dumps(["p", rule], separators=(",", ":")).encode() + b"\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:], sys.stdout.buffer))
