"""The import direction of docs/architecture.md §1: entry scripts and tools -> inference -> engine -> dataloaders, modules.

`layout_violations(root)` reads every package's imports (and its subprocess/runpy calls of top-level scripts) and
names each arrow that runs the wrong way; the second test plants wrong imports in a throwaway copy of the tree and
checks that each one is caught.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modules", "dataloaders", "conversion", "engine", "inference")
# What each package may import from the project (besides the standard library and third-party packages).
ALLOWED = {
    "modules": ("modules",),
    "dataloaders": ("dataloaders", "modules.tokenization", "modules.errors"),
    "conversion": ("conversion", "dataloaders", "modules.errors"),  # the converter: reads files, writes the store
    "engine": ("engine", "dataloaders", "modules"),
    "inference": ("inference", "engine", "dataloaders", "modules"),
}
# Everything above the packages: entry scripts, task-folder scripts, tools, benchmarks and tests.
UPSTREAM = ("tools", "bench", "tests", "video_text_retrieval", "video_captioning", "video_qa")


def top_level_scripts(root: Path) -> set[str]:
    return {path.stem for path in root.glob("*.py")}


def imported_modules(path: Path, root: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(root).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def scripts_run(path: Path, scripts: set[str]) -> set[str]:
    """Top-level scripts `path` runs through subprocess or runpy (a string naming `<script>.py` in the call)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("subprocess", "runpy")):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                found.update(name for name in scripts if inner.value.endswith(f"{name}.py"))
    return found


def layout_violations(root: Path) -> list[str]:
    scripts = top_level_scripts(root)
    project = {*PACKAGES, *UPSTREAM, *scripts}
    offending = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            where = path.relative_to(root)
            for name in imported_modules(path, root):
                if name.split(".")[0] in project and not any(name == a or name.startswith(a + ".") for a in allowed):
                    offending.append(f"{where} imports {name}")
            offending.extend(f"{where} runs {script}.py" for script in sorted(scripts_run(path, scripts)))
    return sorted(offending)


def test_packages_import_only_downstream():
    assert layout_violations(ROOT) == []


def test_a_wrong_arrow_is_caught(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    for script in top_level_scripts(ROOT):
        shutil.copy(ROOT / f"{script}.py", tmp_path)
    assert layout_violations(tmp_path) == []  # the copy is as clean as the tree
    planted = {
        "engine/trainer.py": "import predict\n",
        "engine/entry.py": "from inference.video_index import VideoIndex\n",
        "engine/tasks/retrieval.py": "from ..evaluation import metrics\nfrom ...inference import trained_model\n",
        "dataloaders/video.py": "import tools.demo\nfrom engine import distributed\n",
        "modules/clip.py": "from dataloaders.video import normalize_video\n",
        "inference/video_index.py": "import subprocess\nsubprocess.run(['python', 'frozen_tfrecord.py'])\n",
    }
    for relative, line in planted.items():
        path = tmp_path / relative
        path.write_text(path.read_text() + line)
    assert layout_violations(tmp_path) == [
        "dataloaders/video.py imports engine",
        "dataloaders/video.py imports tools.demo",
        "engine/entry.py imports inference.video_index",
        "engine/tasks/retrieval.py imports inference",
        "engine/trainer.py imports predict",
        "inference/video_index.py runs frozen_tfrecord.py",
        "modules/clip.py imports dataloaders.video",
    ]
