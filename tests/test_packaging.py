"""Installation and command-line facts: omniq never shadows the Hugging Face `kernels`
package, `pip install .` builds a wheel with omniq.kernels / omniq.backends inside, the CLI
works from a fresh process, and the README's support matrix is the registry's."""
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, **kw):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def test_import_kernels_never_finds_omniq(tmp_path):
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else 'NONE')"
    out = _run(["-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    try:  # the HF package vLLM-Omni depends on: `import kernels` must still find it
        dist = importlib.metadata.distribution("kernels")
        expected = str(Path(dist.locate_file("kernels/__init__.py")).resolve())
        assert str(Path(origin).resolve()) == expected
    except importlib.metadata.PackageNotFoundError:
        assert origin == "NONE"
    assert Path(origin).resolve() != (ROOT / "kernels" / "__init__.py").resolve()
    # and omniq's own kernels are reachable under their installed name
    out = _run(["-c", "import omniq.kernels, omniq.backends; print(omniq.kernels.__name__)"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "omniq.kernels", out.stderr


def test_wheel_installs_kernels_and_backends_under_omniq(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("omniq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "omniq/kernels/__init__.py" in names and "omniq/backends/reference.py" in names
    assert not any(n.startswith(("kernels/", "backends/")) for n in names)


def test_cli_doctor_and_explain(tmp_path):
    out = _run(["-m", "omniq", "doctor"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "torch_npu" in out.stdout and "kernels:" in out.stdout
    out = _run(["-m", "omniq", "explain", "--scheme", "gptq", "--bits", "4", "--group-size", "128",
                "--n", "8192", "--k", "8192", "--m", "1"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "chosen" in out.stdout and "reference" in out.stdout
    out = _run(["-m", "omniq", "explain", "--scheme", "nosuch", "--n", "8", "--k", "8"], tmp_path)
    assert out.returncode == 2 and "unknown quantization scheme 'nosuch'" in out.stderr


def test_readme_support_matrix_is_generated_from_the_registry():
    from omniq.cli import support_matrix
    readme = (ROOT / "README.md").read_text()
    assert support_matrix() in readme, "README's support matrix is stale: paste `python -m omniq matrix`"


def test_list_schemes_names_the_public_methods():
    import omniq
    names = set(omniq.list_schemes())
    for required in ("fp8", "int8", "gptq", "awq", "auto_round", "mxfp8", "mxfp4", "mxfp4_dualscale",
                     "nvfp4", "gguf", "w8a8", "w8a8_dynamic", "w4a8_dynamic"):
        assert required in names
