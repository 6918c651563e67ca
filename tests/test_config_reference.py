"""The docs state each setting's default in one place, made from the code.

The places are the blocks between ``<!-- defaults:proxy -->`` / ``<!-- /defaults:proxy -->``
and ``<!-- defaults:agent -->`` / ``<!-- /defaults:agent -->`` (scripts/config-reference
--write fills them); they may live in any document under docs/ or in the README.
"""

import re

from devtools.config_reference import PROCESSES, blocks, documents, table
from enclave_common.config import reference

_ROW_KEY = re.compile(r"^\|\s*`([\w.<>]+)`\s*\|", re.MULTILINE)


def test_each_process_has_one_generated_reference_and_it_is_current() -> None:
    found = [
        (path.name, process, text)
        for path in documents()
        for process, text in blocks(path.read_text(encoding="utf-8"))
    ]
    assert sorted(process for _, process, _ in found) == sorted(PROCESSES), (
        "each of <!-- defaults:proxy --> and <!-- defaults:agent --> must appear once in "
        "README.md or docs/*.md"
    )
    for name, process, text in found:
        assert text == table(process), f"{name}: run scripts/config-reference --write"


def test_no_other_table_lists_a_setting() -> None:
    # A second table of settings would state their defaults a second time.
    keys = {row.key for cls in PROCESSES.values() for row in reference(cls)}
    keys |= {key.rsplit(".", 1)[-1] for key in keys}
    for path in documents():
        text = path.read_text(encoding="utf-8")
        for _, block in blocks(text):
            text = text.replace(block, "")
        listed = sorted(keys & set(_ROW_KEY.findall(text)))
        assert not listed, f"{path.name} lists settings outside the generated reference: {listed}"


def test_every_setting_says_what_it_is() -> None:
    for process, cls in PROCESSES.items():
        for row in reference(cls):
            assert row.doc and row.default, f"{process}: {row.key}"
