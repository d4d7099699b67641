"""Build-time pages (mkdocs-gen-files): the options reference and the API reference.

Both are generated from the code on every ``mkdocs build``, so they cannot go stale:

* ``reference/options.md`` from the pydantic models that validate recipes (the recipe
  sections in ``snncompress.recipe`` and every registered stage kind's options model);
* ``reference/api/`` one page per module, found by walking the package's source tree, with
  a ``SUMMARY.md`` that mkdocs-literate-nav turns into the navigation;
* ``results/`` a copy of the repository's results folders, so method pages can link to the
  experiment write-ups next to their reports.
"""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import mkdocs_gen_files
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "snncompress"


# ----------------------------------------------------------------------------- options reference

def _type_name(annotation) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else repr(annotation)
    return text.replace("typing.", "").replace("NoneType", "None").replace(" | ", " or ")


def _default(field) -> str:
    if field.default_factory is not None:
        return repr(field.default_factory())
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "(section)"
    return repr(field.default)


LIMIT_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}


def _limit(item) -> str:
    """``Ge(ge=1)`` -> ``>= 1``; a pattern as itself; anything else as pydantic writes it."""
    if getattr(item, "pattern", None):
        return f"pattern `{item.pattern}`"
    for attribute, sign in LIMIT_SIGNS.items():
        if getattr(item, attribute, None) is not None:
            return f"{sign} {getattr(item, attribute)}"
    return f"`{item!r}`"


def _limits(field) -> str:
    return ", ".join(_limit(item) for item in field.metadata)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    rows = ["| option | type | default | limits | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        rows.append("| `{}` | `{}` | `{}` | {} | {} |".format(
            name, _cell(_type_name(field.annotation)), _cell(_default(field)),
            _cell(_limits(field)), _cell(field.description or "")))
    return "\n".join(rows)


def options_page() -> str:
    from snncompress import recipe
    from snncompress.stages import stage_kinds

    lines = [
        "# Options reference",
        "",
        "Generated at build time from the pydantic models that validate recipes, so it lists exactly",
        "what `snncompress run` accepts (`snncompress stages KIND` prints the same from the command line).",
        "",
        "## Recipe sections",
        "",
    ]
    sections = [("recipe (top level)", recipe.Recipe), ("data", recipe.DataConfig),
                ("model", recipe.ModelConfig), ("model.neuron", recipe.NeuronConfig)]
    for title, model in sections:
        lines += [f"### {title}", "", options_table(model), ""]
    lines += ["## Stage kinds", "",
              "Every stage entry takes `kind` (one of the kinds below) and the options of its kind.", ""]
    kinds = stage_kinds()
    for kind in sorted(kinds):
        stage = kinds[kind]
        options = stage.options
        summary = (inspect.getdoc(stage.run) or "").split("\n\n")[0].replace("\n", " ")
        lines += [f"### {kind}", ""]
        if summary:
            lines += [summary, ""]
        lines += [f"Module `snncompress.stages.{stage.module}`; options model `{options.__name__}`.", ""]
        lines += [options_table(options, skip=("kind",)), ""]
    return "\n".join(lines)


with mkdocs_gen_files.open("reference/options.md", "w") as page:
    page.write(options_page())


def report_schema_page() -> str:
    """The JSON Schema of report.json, from the pydantic model every report is built through."""
    import json

    from snncompress.report_schema import report_json_schema

    return ("# report.json schema\n\nGenerated from `snncompress.report_schema.Report`, the model every "
            "report is built and validated through (see [the report contract](report.md)).\n\n```json\n"
            + json.dumps(report_json_schema(), indent=2) + "\n```\n")


with mkdocs_gen_files.open("reference/report-schema.md", "w") as page:
    page.write(report_schema_page())


# ----------------------------------------------------------------------------- API reference

nav = mkdocs_gen_files.Nav()
for source in sorted(PACKAGE.rglob("*.py")):
    parts = list(source.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__main__":
        continue
    if parts[-1] == "__init__":
        parts = parts[:-1]
    module = ".".join(parts)
    doc_path = Path("reference", "api", *parts).with_suffix(".md")
    if source.name == "__init__.py":
        doc_path = Path("reference", "api", *parts, "index.md")
    nav[tuple(parts)] = doc_path.relative_to("reference/api").as_posix()
    with mkdocs_gen_files.open(doc_path, "w") as page:
        page.write(f"# `{module}`\n\n::: {module}\n")
    mkdocs_gen_files.set_edit_path(doc_path, source.relative_to(ROOT))

with mkdocs_gen_files.open("reference/api/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())


# ----------------------------------------------------------------------------- results write-ups

IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)\n?")


def _present_images_only(path: Path) -> str:
    """The Markdown text with image links to files the repository does not keep left out.

    Run reports link the plots every run writes; the repository keeps only some of them.
    """
    def keep(match: re.Match) -> str:
        return match.group(0) if (path.parent / match.group(1)).is_file() else ""
    return IMAGE_LINK.sub(keep, path.read_text(encoding="utf-8"))


results_nav = mkdocs_gen_files.Nav()
for path in sorted((ROOT / "results").rglob("*")):
    target = path.relative_to(ROOT).as_posix()
    if path.is_file() and path.suffix == ".md":
        with mkdocs_gen_files.open(target, "w") as copy:
            copy.write(_present_images_only(path))
        folder = path.parent.relative_to(ROOT / "results").parts
        results_nav[(*folder, path.stem)] = path.relative_to(ROOT / "results").as_posix()
    elif path.is_file() and path.suffix in {".png", ".json", ".csv"}:
        with mkdocs_gen_files.open(target, "wb") as copy:
            copy.write(path.read_bytes())

with mkdocs_gen_files.open("results/SUMMARY.md", "w") as summary:
    summary.writelines(results_nav.build_literate_nav())
