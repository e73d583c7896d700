"""What a user's data file must hold, checked before ``datasets`` reads it: ``datasets`` fails on an empty,
non-UTF-8, header-only or malformed file with a long traceback; here each gets one line naming the file, the line
and what was expected.
"""

from __future__ import annotations

import csv
import io
import json


class DataError(ValueError):
    """Bad user data: message is one line naming the bad value and what was expected."""


SHAPES = {  # what a user file must hold, named when it does not
    ".csv": "a header row naming the columns, then one row per example",
    ".jsonl": "one JSON object per line",
    ".json": 'a list of records [{"text": ..., "label": ...}, ...] or one JSON object per line',
}


def check_file(source: str, raw: bytes, suffix: str) -> None:
    """Refuse what ``datasets`` would fail on with a traceback: an empty file, a file that is not UTF-8,
    a header-only or ragged CSV, a malformed JSON line (named by number), JSON that is not records."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"data file {source!r} is not UTF-8: byte 0x{raw[error.start]:02x} on line {line}; expected UTF-8 text "
            "(re-save it as UTF-8)"
        ) from None
    if not text.strip():
        raise DataError(f"data file {source!r} is empty; expected {SHAPES[suffix]}")
    if suffix == ".csv":
        _check_csv(source, text)
    elif suffix == ".jsonl":
        _check_json_lines(source, text)
    else:
        _check_json(source, text)


def _check_csv(source: str, text: str) -> None:
    """A header, then at least one row, none wider than the header, every quote closed."""
    limit = csv.field_size_limit(2**31 - 1)  # the default (128 KiB) would refuse a long document in one cell
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] = []
    examples = 0
    ended = 0  # the last line read: a row starts on the next one (a quoted field may span lines)
    try:
        for row in rows:
            start, ended = ended + 1, rows.line_num
            if row and not header:
                header = row
            elif len(row) > len(header):
                raise DataError(
                    f"data file {source!r} line {start} has {len(row)} fields, its header {len(header)}; "
                    "expected at most one field per column (quote a text that holds a comma)"
                )
            elif row:
                examples += 1
    except csv.Error as error:
        problem = "opens a quote that is never closed" if "end of data" in str(error) else f"is not valid CSV ({error})"
        raise DataError(f"data file {source!r} line {ended + 1} {problem}; expected {SHAPES['.csv']}") from None
    finally:
        csv.field_size_limit(limit)
    if not examples:
        raise DataError(f"data file {source!r} has a header ({', '.join(header)}) but no rows; expected one row per example")


def _check_json_lines(source: str, text: str) -> None:
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"data file {source!r} line {number} is not valid JSON ({error.msg} at column {error.colno}); "
                "expected one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"data file {source!r} line {number} holds {_json_kind(record)}; expected one JSON object per line")


def _check_json(source: str, text: str) -> None:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several values: JSON Lines in a .json file, which datasets reads as such
            _check_json_lines(source, text)
            return
        raise DataError(
            f"data file {source!r} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"expected {SHAPES['.json']}"
        ) from None
    if not isinstance(document, list) or not document:
        raise DataError(f"data file {source!r} holds {_json_kind(document)}; expected {SHAPES['.json']}")
    for number, record in enumerate(document, 1):
        if not isinstance(record, dict):
            raise DataError(f"data file {source!r} holds a list whose item {number} is {_json_kind(record)}; expected {SHAPES['.json']}")


def _json_kind(value: object) -> str:
    """How a JSON value is named in a message: 'a number', 'an empty list'..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "one JSON object"
