"""JSON as strict readers (jq, JavaScript, Go) parse it: for tests of what nadray writes."""

from __future__ import annotations

import json
from typing import Any


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses the NaN and Infinity tokens Python would accept."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)
