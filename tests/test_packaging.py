"""tools/, graphs/ and training/ install as echo_agent.tools, echo_agent.graphs and echo_agent.training through
setuptools' package-dir mapping: no symlinks in the checkout, no generic top-level package in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkout_has_no_symlinks() -> None:
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    links = [line.split("\t")[1] for line in tracked.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_the_editable_install_maps_the_subpackages_to_the_repo_folders() -> None:
    import echo_agent.graphs.echo
    import echo_agent.tools.listen
    import echo_agent.training.grpo

    assert Path(echo_agent.tools.listen.__file__).resolve() == ROOT / "tools" / "listen.py"
    assert Path(echo_agent.graphs.echo.__file__).resolve() == ROOT / "graphs" / "echo.py"
    assert Path(echo_agent.training.grpo.__file__).resolve() == ROOT / "training" / "grpo.py"


def test_the_wheel_holds_one_namespace_with_the_weights(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("echo_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"echo_agent", wheel.name.split("-py")[0] + ".dist-info"}
    for path in ("echo_agent/tools/listen.py", "echo_agent/graphs/runner.py", "echo_agent/training/grpo.py",
                 "echo_agent/assets/echo-tiny/model.safetensors", "echo_agent/py.typed"):  # fmt: skip
        assert path in names, path
