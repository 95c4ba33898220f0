"""The structure the code relies on: what loads without what, and who owns which names."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.support import REPO


def test_run_and_launch_configs_load_and_validate_without_torch_wandb_or_codecarbon() -> None:
    """`python -m launch` composes and validates the run config on a login node: it must not pay for (or need)
    torch, DeepSpeed, W&B or CodeCarbon."""
    script = (
        "import sys\n"
        "from launch.config import LaunchConfig\n"
        "from pretrain.core.config import RunConfig, run_problems\n"
        "from pretrain.core.run_dir import RunDir\n"
        "problems = run_problems(RunConfig(), None, 1)\n"
        "assert any('data_dir' in m for m in problems.messages), problems.messages\n"
        "heavy = ('torch', 'torch.distributed', 'deepspeed', 'wandb', 'codecarbon')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


PACKAGES = ("common", "data_prep", "pretrain", "launch")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _imports(tree: ast.Module, *, lazy: bool) -> set[str]:
    """Modules imported at import time (and, with lazy, inside functions too); TYPE_CHECKING blocks count."""
    names: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            if lazy:
                self.generic_visit(node)

        visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

        def visit_Import(self, node: ast.Import) -> None:
            names.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.level == 0:
                names.add(node.module)

    Visitor().visit(tree)
    return names


def _strings(tree: ast.Module) -> set[str]:
    """String constants of a module, docstrings left out."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_no_import_cycle_among_pretrain_modules() -> None:
    modules = _modules()
    graph = {
        name: {target for imported in _imports(tree, lazy=False) for target in [imported] if target in modules}
        for name, tree in modules.items()
        if name.startswith("pretrain")
    }

    def visit(name: str, path: list[str]) -> None:
        for target in graph.get(name, ()):
            assert target not in path, "import cycle: " + " -> ".join([*path, target])
            visit(target, [*path, target])

    for name in graph:
        visit(name, [name])


def test_the_model_imports_only_torch_the_standard_library_and_its_config() -> None:
    imported = _imports(_modules()["pretrain.core.model"], lazy=True)
    allowed = {"torch", "torch.nn", "torch.nn.functional", "pretrain.core.model_config", "__future__", "math"}
    assert imported <= allowed, imported - allowed


def test_pretrain_reads_only_the_manifest_and_the_text_cleaning_of_data_prep() -> None:
    used = {
        imported
        for name, tree in _modules().items()
        if name.startswith("pretrain")
        for imported in _imports(tree, lazy=True)
        if imported.startswith("data_prep")
    }
    assert used <= {"data_prep.manifest", "data_prep.documents"}, used


def test_each_run_directory_name_is_spelled_in_one_module() -> None:
    names = ("metrics.jsonl", "status.json", "trainer_state.json", "config.yaml", "COMPLETE", "run_id", "latest")
    names += ("process.json", "sweep.json")
    spelled: dict[str, list[str]] = {name: [] for name in names}
    for module, tree in _modules().items():
        strings = _strings(tree)
        for name in names:
            if any(name in text.split("/") for text in strings):
                spelled[name].append(module)
    assert all(len(modules) == 1 for modules in spelled.values()), spelled


def test_no_callback_assigns_a_trainer_attribute() -> None:
    for module, tree in _modules().items():
        if not module.startswith("pretrain.core.callbacks"):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                owner = target
                while isinstance(owner, ast.Attribute | ast.Subscript):
                    owner = owner.value
                assert not (isinstance(owner, ast.Name) and owner.id == "trainer" and owner is not target), (
                    f"{module} line {node.lineno} assigns to the trainer"
                )
