"""Local training text: the documentation of Python's standard library, read from this interpreter.

The text is the docstrings of standard-library modules (Python Software Foundation License, which
allows redistribution and derived works). It is read from the local installation, never fetched.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

# NOTE: a fixed, sorted module list keeps the corpus (and so the tokenizer) deterministic for one
# Python version; the manifest records that version.
MODULES = (
    "argparse", "asyncio/base_events", "asyncio/events", "asyncio/streams", "asyncio/tasks",
    "bisect", "calendar", "collections/__init__", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email/message", "enum", "fractions",
    "functools", "heapq", "http/client", "http/server", "inspect", "ipaddress", "json/__init__",
    "json/decoder", "logging/__init__", "logging/handlers", "mailbox", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re/__init__", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "turtle", "typing",
    "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings", "zipfile",
)


def stdlib_docstrings(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Docstrings of the given standard-library modules, in a fixed order, one string each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for name in modules:
        source = root / f"{name}.py"
        if not source.is_file():
            continue
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) > 40:
                    texts.append(doc)
    return texts
