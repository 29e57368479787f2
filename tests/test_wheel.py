"""The package as users install it: a wheel, in a fresh virtual environment, away from
the checkout. Dependencies come from the pinned stack already installed for the tests
(the fresh environment sees its site-packages through a .pth file, not the editable
install of this checkout), so the test needs no network and checks the wheel alone."""

import glob
import os
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("marl", "envs", "algos", "experiments")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), ROOT],
        check=True,
        capture_output=True,
    )
    wheel = glob.glob(str(tmp / "dist" / "*.whl"))
    assert len(wheel) == 1
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = str(venv / "bin" / "python")
    target = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies: the test environment's site-packages, without its .pth files
    # (which hold this checkout's editable install)
    with open(os.path.join(target, "pinned_stack.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", wheel[0]], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return py, target, tmp, env


def test_every_module_imports_from_the_wheel(installed):
    py, target, tmp, env = installed
    code = (
        "import importlib, pkgutil, sys\n"
        f"names = []\nfor pkg in {PACKAGES!r}:\n"
        "    m = importlib.import_module(pkg)\n"
        f"    assert m.__file__.startswith({target!r}), m.__file__\n"
        "    names += [pkg] + [i.name for i in pkgutil.walk_packages(m.__path__, pkg + '.')]\n"
        "for n in names:\n    importlib.import_module(n)\n"
        "print(len(names))\n"
    )
    out = subprocess.run([py, "-c", code], cwd=tmp, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= 30


def test_the_installed_cli_trains(installed):
    py, _, tmp, env = installed
    out = subprocess.run([py, "-m", "experiments.train", "--help"], cwd=tmp, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "--regularizer.kind" in out.stdout, out.stderr[-2000:]
    args = [
        "--algo",
        "ippo",
        "--env",
        "mpe:simple_spread",
        "--num-envs",
        "4",
        "--num-steps",
        "8",
        "--num-minibatches",
        "2",
        "--update-epochs",
        "1",
        "--hidden",
        "16",
        "--total-steps",
        "64",
        "--eval-episodes",
        "2",
        "--no-progress",
        "--runs-dir",
        str(tmp / "runs"),
        "--run-name",
        "w",
    ]
    out = subprocess.run([py, "-m", "experiments.train", *args], cwd=tmp, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp / "runs" / "w" / "metrics.jsonl").read_text().count("\n") == 2
    assert "greedy evaluation" in out.stdout
