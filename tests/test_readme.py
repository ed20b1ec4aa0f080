"""CI must run exactly the README's test command, so a green CI proves the documented set-up, at both
ends of the supported versions."""
import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    setup = _readme_commands()[:2]
    assert len(setup) == 2
    assert "lpld run --recipe fmnist" in setup[0] and "pytest" in setup[1]
    assert all("dataset-fashion-mnist" in command and "pip install" in command for command in setup)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def _declared_ranges() -> dict[str, str]:
    """setup.py's requirement strings by package name (runtime and test), read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    lists = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("RUNTIME", "TEST")}
    return {Requirement(spec).name: spec for spec in lists["RUNTIME"] + lists["TEST"]}


def test_the_oldest_environment_pins_every_lower_bound():
    """tests/requirements-oldest.txt is the low end of setup.py's ranges (nvidia-dali aside: the GPU
    check machine has none), and the README's test command runs the suite in it too."""
    ranges = _declared_ranges()
    pins = {}
    for line in (ROOT / "tests" / "requirements-oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            pins[requirement.name] = Version(next(iter(requirement.specifier)).version)
    assert set(pins) == set(ranges) - {"nvidia-dali-cuda130"}
    for name, version in pins.items():
        specifier = Requirement(ranges[name]).specifier
        lower = next(Version(spec.version) for spec in specifier if spec.operator == ">=")
        assert version == lower and version in specifier, (name, version, ranges[name])
        assert any(spec.operator == "<" for spec in specifier), f"{name}: an upper bound at the next major version"
    assert "-r tests/requirements-oldest.txt" in _readme_commands()[1]
    assert _readme_commands()[1].count("python -m pytest -q") == 2
