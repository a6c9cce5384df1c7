"""The environment-variable tables of train_gpt.py, generated from its settings dataclasses.

    python docs/env_table.py            # print the Markdown tables (the README's copy must equal this)

Every knob is a field of one of train_gpt.py's section dataclasses (RunSettings, DataSettings, ...);
its env var is the field name in upper case and its help text is the comment on the field's line.
Keeping the help in comments costs no counted bytes (the packed script drops comments); this tool
reads them from the source with `tokenize`, so the README never drifts from the code.
"""

import ast
import base64
import dataclasses
import io
import lzma
import os
import re
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SECTION_TITLES = {"run": "Run", "data": "Data", "model": "Model", "optim": "Optimizers and training",
                  "quant": "Quantization and artifact", "eval": "Evaluation and TTT"}


def field_help(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's line, for every annotated class field."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    helps = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    helps[(node.name, item.target.id)] = comments.get(item.lineno, "")
    return helps


def script_source(path: str) -> str:
    """The source of a training script; a packed (counted) script is unpacked, never executed."""
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    packed = re.fullmatch(r'import lzma as _L,base64 as _B\nexec\(_L\.decompress\(_B\.b85decode\("([^"]*)"\)\)\)\n?',
                          source)
    if packed:
        source = lzma.decompress(base64.b85decode(packed.group(1))).decode("utf-8")
    return source


def knob_names(path: str) -> frozenset[str]:
    """Every environment variable a training script reads as a setting: the upper-cased fields of the
    classes listed in its `SECTIONS = {...}` dict, read from the source without importing it."""
    tree = ast.parse(script_source(path))
    sections = set()
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SECTIONS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            sections = {value.id for value in node.value.values if isinstance(value, ast.Name)}
    names = {item.target.id.upper() for node in tree.body if isinstance(node, ast.ClassDef) and node.name in sections
             for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    if not names:
        raise ValueError(f"{path}: no settings found (expected section dataclasses listed in SECTIONS)")
    return frozenset(names)


def env_var_table() -> list[dict]:
    """One row per knob: section, env name, default, help. Raises if a knob has no help comment."""
    import train_gpt

    with open(train_gpt.__file__, encoding="utf-8") as handle:
        helps = field_help(handle.read())
    rows = []
    for section, settings in train_gpt.SECTIONS.items():
        for f in dataclasses.fields(settings):
            text = helps.get((settings.__name__, f.name), "")
            if not text:
                raise ValueError(f"train_gpt.py: {settings.__name__}.{f.name} has no help comment on its line")
            rows.append({"section": section, "env": f.name.upper(), "default": f.default, "help": text})
    return rows


def env_var_markdown() -> str:
    """One Markdown table per section; a | inside a cell is escaped."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    rows = env_var_table()
    parts = []
    for section, title in SECTION_TITLES.items():
        parts += [f"### {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for row in rows:
            if row["section"] == section:
                default = row["default"] if row["default"] != "" else '""'
                parts.append(f"| `{row['env']}` | `{cell(default)}` | {cell(row['help'])} |")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


if __name__ == "__main__":
    print(env_var_markdown())
