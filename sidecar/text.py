"""Text that UTF-8 can carry. Python strings can hold a lone surrogate ("\\ud800": json.loads and
PyYAML read the escape, surrogateescape makes one of a byte that is not UTF-8), which no header,
span, log line or protobuf string can carry."""

from __future__ import annotations

import re
from typing import Any

# A JSON escape of a surrogate (a pair, as for an emoji, is one character; alone it is none).
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def is_text(s: str) -> bool:
    """Whether UTF-8 can encode `s` (it cannot encode a lone surrogate)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def all_text(data: Any) -> bool:
    """Whether every string of a JSON-like document (mapping keys too) is text (in a loop)."""
    todo = [data]
    while todo:
        node = todo.pop()
        if isinstance(node, str):
            if not is_text(node):
                return False
        elif isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return True
