"""The package's rooms and what may import what, read from the source (no import needed), and
the repository's documents: nothing cites a file that is not in the repository."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastpref"
HEAVY = ("diffusers", "peft", "accelerate", "transformers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """Every module an ``import`` statement of ``path`` names, made absolute; a ``from X import
    name`` also yields ``X.name`` (it may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def room_files(room: str):
    return sorted((PACKAGE / room).rglob("*.py"))


def offending(files, predicate):
    return sorted(
        {f"{path.relative_to(ROOT)}: {name}" for path in files for name in imported_modules(path) if predicate(name)}
    )


def test_loss_room_imports_only_itself_and_its_dependencies():
    files = room_files("loss") + [PACKAGE / "__init__.py", PACKAGE / "reference.py"]
    others = ("fastpref.train", "fastpref.demo", "fastpref.testing", "fastpref.scorers")
    assert offending(files, lambda name: name.startswith(others) or name.split(".")[0] in HEAVY) == []


def test_trainer_uses_the_loss_only_through_the_public_api():
    import fastpref

    public = {f"fastpref.{name}" for name in fastpref.__all__}

    def private_loss(name):
        return name.startswith("fastpref.loss") or (name.startswith("fastpref.reference.") and name not in public)

    files = room_files("train") + room_files("demo") + room_files("evaluate") + room_files("scorers")
    assert offending(files, private_loss) == []


def test_the_scorers_import_no_room_above_them():
    """fastpref.scorers sits low, shared by the trainer's validation and the evaluation: it imports
    neither of them nor the demo, and its heavy packages only inside the functions that load."""
    above = ("fastpref.train", "fastpref.evaluate", "fastpref.demo", "fastpref.testing")
    assert offending(room_files("scorers"), lambda name: name.startswith(above)) == []
    lazy = (*HEAVY, "open_clip", "ImageReward")
    top_level = []
    for path in room_files("scorers"):
        for node in ast.parse(path.read_text()).body:  # module level only: function bodies load lazily
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            top_level += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.split(".")[0] in lazy]
    assert top_level == []


def test_no_room_below_the_evaluation_imports_it():
    """fastpref.evaluate sits above train: it may import the trainer and the public API, but the
    loss, the trainer and the demo never import it."""
    files = room_files("loss") + room_files("train") + room_files("demo")
    files += [path for path in PACKAGE.glob("*.py") if path.name != "cli.py"]  # the command line starts it
    assert offending(files, lambda name: name.startswith("fastpref.evaluate")) == []


def test_production_code_never_imports_the_test_fixtures():
    production = room_files("loss") + room_files("train") + room_files("demo") + room_files("evaluate")
    production += room_files("scorers")
    production += [path for path in PACKAGE.glob("*.py")]
    assert offending(production, lambda name: name.startswith("fastpref.testing")) == []


def test_import_fastpref_loads_no_training_library():
    code = (
        "import sys, fastpref; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'peft', 'accelerate')"
        " or m.startswith(('fastpref.train', 'fastpref.demo', 'fastpref.testing'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def family_tests(path: Path):
    """``(line, text)`` of each comparison in ``path`` with a model family's name (``arch ==
    "sdxl"``, ``name in ("sd15", ...)``): the decisions the family seam owns."""
    from fastpref.train.families import FAMILIES

    names = set(FAMILIES)

    def is_name(node):
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(element) for element in node.elts)
        return False

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(is_name(part) for part in [node.left, *node.comparators]):
            yield node.lineno, ast.unparse(node)


def test_no_code_outside_the_families_tests_which_family_it_runs():
    families = PACKAGE / "train" / "families"
    files = [path for path in sorted(PACKAGE.rglob("*.py")) if families not in path.parents]
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    found = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in files for line, text in family_tests(path)]
    assert found == []


# Repository-relative file paths named in the package, the tests, csrc/ and the docs.
REFERENCE = re.compile(
    r"(?<![\w/.-])((?:docs|csrc|benchmarks|scripts|tests|fastpref)/[\w./-]*\.(?:py|md|h|cpp|cu|sh|json|png|toml))\b"
)
OUTSIDE = ("../" + "shared", "/" + "work/")  # split so that this file does not match itself
SOURCES = ("fastpref", "csrc", "tests", "benchmarks", "docs", "scripts")


def text_files():
    files = [ROOT / "README.md"]
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".h", ".cpp", ".cu", ".sh") and "results" not in path.parts:
                files.append(path)
    return files


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_cite_only_files_in_the_repository(path):
    text = path.read_text()
    assert [marker for marker in OUTSIDE if marker in text] == []
    missing = []
    for cited in REFERENCE.findall(text):
        # Globs and run-time outputs (``benchmarks/results/quick-<device>.json``) are not files.
        if "*" in cited or cited.startswith("benchmarks/results/quick-"):
            continue
        if not (ROOT / cited).exists():
            missing.append(cited)
    assert missing == []


DOTTED = re.compile(r"(?<![\w./-])(fastpref(?:\.[A-Za-z_]\w*)+)")


def resolves(dotted: str) -> bool:
    """Whether a dotted name (``fastpref.<module>.<attribute>``) names a module, or an attribute
    reached from one."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_name_only_modules_that_exist(path):
    names = sorted(set(DOTTED.findall(path.read_text())))
    assert [name for name in names if not resolves(name)] == []
