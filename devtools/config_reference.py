"""The configuration reference tables in the docs, made from the settings' declarations.

    scripts/config-reference            # print the tables
    scripts/config-reference --write    # rewrite every marked block in README.md, docs/

A block is what lies between ``<!-- defaults:proxy -->`` and ``<!-- /defaults:proxy -->``
(and the same for ``agent``); each must appear once in the docs. The defaults are
stated there and nowhere else: tests/test_config_reference.py fails while a block
differs from what this prints, is missing, or a table elsewhere lists a setting.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from enclave_agent.runtime.config import AgentConfig
from enclave_common.config import reference
from proxy.config import ProxyConfig

REPO = Path(__file__).resolve().parent.parent
PROCESSES: dict[str, type] = {"proxy": ProxyConfig, "agent": AgentConfig}
_BLOCK = re.compile(r"(<!-- defaults:(\w+) -->\n)(.*?)(<!-- /defaults:\2 -->)", re.DOTALL)


def table(process: str) -> str:
    """The Markdown table of one process's settings: key, default, meaning."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for row in reference(PROCESSES[process]):
        cells = (f"`{row.key}`", row.default, row.doc)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]


def blocks(text: str) -> Iterator[tuple[str, str]]:
    """(process, the block's text) for each marked block in ``text``."""
    for match in _BLOCK.finditer(text):
        yield match.group(2), match.group(3)


def rewrite(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--write"]):
        print(__doc__, file=sys.stderr)
        return 2
    if not args:
        for process in PROCESSES:
            print(f"<!-- defaults:{process} -->\n{table(process)}<!-- /defaults:{process} -->\n")
        return 0
    for path in documents():
        text = path.read_text(encoding="utf-8")
        if rewrite(text) != text:
            path.write_text(rewrite(text), encoding="utf-8")
            print(f"rewrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
