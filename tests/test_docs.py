"""The documentation stays true to the code: flags reference, README length and opening, links."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from coerasing.methods import trainable_names

from .conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOC_FILES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
#: [text](target) in markdown; images (![alt](target)) included.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _flags_reference():
    spec = importlib.util.spec_from_file_location("flags_reference", REPO_ROOT / "scripts" / "flags_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_reference_is_up_to_date():
    module = _flags_reference()
    committed = (REPO_ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert module.render() == committed, (
        "docs/flags.md is out of date with the command lines' flags: run `python scripts/flags_reference.py`"
    )


def test_flags_reference_covers_every_trained_method_and_command():
    module = _flags_reference()
    text = module.render()
    for method in trainable_names():
        assert f"## `erase_pipeline.py --method {method}`" in text
    for command in ("generate_data.py", "evaluate.py", "compare.py"):
        assert f"## `{command}`" in text
    # a flag of each command, with the default its dataclass declares
    assert "| `--iterations` | `1000` |" in text
    assert "| `--num_images` | `500` |" in text


def test_flags_reference_check_fails_on_a_stale_file(tmp_path, capsys):
    module = _flags_reference()
    stale = tmp_path / "flags.md"
    stale.write_text("# Flags reference\n", encoding="utf-8")
    assert module.main(["--check", "--out", str(stale)]) == 1
    assert "python scripts/flags_reference.py" in capsys.readouterr().err
    assert module.main(["--out", str(stale)]) == 0
    assert module.main(["--check", "--out", str(stale)]) == 0


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move details into docs/ (limit 220)"


def test_readme_starts_with_the_two_commands():
    """Title, one paragraph, then a code block whose commands are `make demo` and `make test`."""
    text = README.read_text(encoding="utf-8")
    title, _, rest = text.partition("\n")
    assert title.startswith("# ")
    before, fence, after = rest.partition("```")
    assert fence, "README.md has no code block"
    paragraphs = [p for p in re.split(r"\n\s*\n", before.strip()) if p.strip()]
    assert len(paragraphs) == 1, "README.md must give one paragraph, then the two commands"
    block = after.split("```", 1)[0].splitlines()[1:]  # drop the fence's language tag line
    commands = [line.split("#", 1)[0].strip() for line in block if line.strip()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_at_existing_files(path: Path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # links inside code blocks are not links
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            missing.append(target)
    assert missing == [], f"{path.relative_to(REPO_ROOT)} links to missing files: {missing}"
