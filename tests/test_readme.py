"""CI must run exactly the README's test command, so a green CI proves the documented set-up."""
import re
from pathlib import Path

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
