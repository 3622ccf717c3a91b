"""Policies: a compiled set of Rego modules plus data, behind one small interface.

A ``PolicyBundle`` is what was loaded (module sources, the merged data
document, the entrypoint, a version hash). A ``PolicyEngine`` evaluates it.
Engines are compiled once per bundle version; because neither Rego engine's
objects may be shared between threads (regorus refuses it, regopy keeps the
input as interpreter state), each thread gets its own compiled copy on first
use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pdp.credentials.jose import unicode_text
from pdp.errors import LoadError
from pdp.policy.decision_cache import DecisionCache
from pdp.policy.nesting import MAX_DEPTH, too_deep
from pdp.policy.thread_bound import thread_cache

#: "opa" asks a remote OPA server instead (``pdp.policy.opa_remote``).
ENGINES = ("regopy", "regorus", "opa")
#: Rego language versions a bundle may be written in (``policy.rego_version``); v0 needs regorus.
REGO_VERSIONS = ("v1", "v0")


class PolicyEvalError(RuntimeError):
    """The policy raised an error while being evaluated (conflict, builtin error, bad entrypoint)."""


class Undefined:
    """The entrypoint produced no value for this input."""

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED = Undefined()


@dataclass(frozen=True)
class PolicyBundle:
    modules: tuple[tuple[str, str], ...]
    data: dict[str, Any] = field(hash=False)
    entrypoint: str = "data.pdp.authz.result"
    engine: str = "regopy"
    #: The Rego syntax the modules are read in: the same text means other rules in v0 and v1.
    rego_version: str = "v1"

    @property
    def version(self) -> str:
        h = hashlib.sha256()
        for name, source in self.modules:
            h.update(name.encode() + b"\0" + source.encode() + b"\0")
        h.update(json.dumps(self.data, sort_keys=True).encode())
        h.update(self.entrypoint.encode() + b"\0" + self.engine.encode())
        if self.rego_version != "v1":  # v1 bundles keep the versions they had before v0 was known
            h.update(b"\0rego_version=" + self.rego_version.encode())
        return h.hexdigest()[:16]


def entrypoint_query(path: str) -> str:
    """``pdp/authz/result`` (opa-envoy-plugin's ``path`` style) or ``data.pdp.authz.result`` → a data ref."""
    path = path.strip()
    if path == "data" or path.startswith("data."):
        return path
    return "data." + ".".join(p for p in path.strip("/").split("/") if p)


def _merge(target: dict[str, Any], doc: dict[str, Any], where: str, origin: dict[str, str], key: str,
           prefix: str = "") -> None:
    """Merge ``doc`` into ``target``; two documents setting the same leaf is an error naming both."""
    for name, value in doc.items():
        dotted = f"{prefix}{name}"
        if name in target:
            if isinstance(target[name], dict) and isinstance(value, dict):
                _merge(target[name], value, where, origin, key, dotted + ".")
                continue
            raise LoadError(key, f"data key {dotted!r} is set by both {_origin_of(origin, dotted)} and {where}")
        target[name] = value
        origin[dotted] = where


def _origin_of(origin: dict[str, str], dotted: str) -> str:
    """The document that set ``dotted`` or, for a key inside a copied subtree, its nearest ancestor."""
    while dotted not in origin and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
    return origin.get(dotted, "another document")


def tree_files(root: Path) -> list[Path]:
    """The files under the folder ``root``, sorted, leaving out hidden entries (a name that starts with
    '.') and what lies under them: a ConfigMap mounted by the kubelet holds every file twice, once under
    a hidden timestamped folder (``..2026_12_01_…``) and once as a link to it, and an editor's or a
    version control's hidden files are no part of a policy."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def load_bundle(paths: Iterable[Path], *, entrypoint: str, engine: str, key: str = "policy.paths",
                data_files: Iterable[Path] = (), include_tests: bool = False,
                rego_version: str = "v1") -> PolicyBundle:
    """Read every ``.rego`` module and ``.json`` data document under ``paths`` (and ``data_files``).

    Test modules (``*_test.rego``) are left out unless ``include_tests``: they
    take no part in decisions, and rego-cpp cannot compile many ``with``
    expressions they hold.
    """
    modules: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    json_files: list[tuple[Path, str]] = [(f, "policy.data") for f in data_files]
    for root in paths:
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = tree_files(root)
        else:
            raise LoadError(key, f"{str(root)!r} does not exist")
        for f in files:
            if f.suffix == ".rego" and (include_tests or not f.name.endswith("_test.rego")):
                try:
                    source = f.read_text("utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise LoadError(key, f"cannot read {str(f)!r}: {exc}") from exc
                deep = too_deep(source)
                if deep is not None:
                    raise LoadError(key, f"{f}:{deep}: '[' and '{{' nest deeper than {MAX_DEPTH} levels, which "
                                         "the Rego parser takes exponential time to read")
                modules.append((str(f), source))
            elif f.suffix == ".json":
                json_files.append((f, key))
    for f, file_key in json_files:
        try:
            doc = json.loads(f.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise LoadError(file_key, f"data document {str(f)!r} is not readable JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise LoadError(file_key, f"data document {str(f)!r} is not a JSON object")
        if not unicode_text(doc):
            raise LoadError(file_key, f"data document {str(f)!r} holds a lone surrogate (\\ud800-\\udfff)")
        _merge(data, doc, repr(str(f)), origin, file_key)
    if not modules:
        raise LoadError(key, "no .rego modules found")
    if rego_version not in REGO_VERSIONS:
        raise LoadError("policy.rego_version", f"unknown Rego version {rego_version!r} (v1 or v0)")
    return PolicyBundle(tuple(modules), data, entrypoint_query(entrypoint), engine, rego_version)


class Evaluator(Protocol):
    """One thread's compiled copy of a bundle."""

    def evaluate(self, input_doc: dict[str, Any]) -> Any:
        """The entrypoint's value, or ``UNDEFINED``; raise ``PolicyEvalError`` on an evaluation error."""

    def query(self, ref: str, input_doc: dict[str, Any] | None) -> Any:
        """Evaluate any data reference (used by the Rego test runner)."""


#: Each thread keeps its compiled evaluators by bundle version, in its own cache rather than per engine,
#: so that an evaluator is dropped by the thread that made it (regorus engines refuse to be freed on
#: another thread, which is what dropping a replaced engine's thread-locals would do; ``thread_bound``).
_EVALUATORS_PER_THREAD = 4


class PolicyEngine:
    """Evaluates one bundle from any thread, compiling a per-thread evaluator on first use."""

    #: Whether ``evaluate`` waits on the network (a remote engine): ``Pdp.decide(network=False)`` then defers.
    needs_network = False

    def __init__(self, bundle: PolicyBundle, *, decision_cache_size: int = 0) -> None:
        from pdp.policy.rego import compile_evaluator

        self.bundle = bundle
        self.version = bundle.version
        #: Outcomes by the facts this bundle reads, or None when it reads more (``decision_cache``).
        self.decisions = DecisionCache.for_modules((source for _, source in bundle.modules), decision_cache_size)
        self._compile = compile_evaluator
        # Compile once here so that a broken bundle fails at load time, not on the first request.
        self._evaluator()

    def _evaluator(self) -> Evaluator:
        cache: dict[str, Evaluator] = thread_cache("evaluators")
        evaluator = cache.get(self.version)
        if evaluator is None:
            evaluator = self._compile(self.bundle)
            while len(cache) >= _EVALUATORS_PER_THREAD:  # the oldest versions were replaced by now
                del cache[next(iter(cache))]
            cache[self.version] = evaluator
        return evaluator

    def evaluate(self, input_doc: dict[str, Any]) -> Any:
        return self._evaluator().evaluate(input_doc)

    def close(self) -> None:
        """Release what evaluating holds open (nothing in process; a remote engine's connections)."""

    def query(self, ref: str, input_doc: dict[str, Any] | None = None) -> Any:
        return self._evaluator().query(ref, input_doc)
