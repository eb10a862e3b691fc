"""launch/local.py preloads tcmalloc into the processes it starts when it is installed, never into
itself, never over a user's own preload or their opt-out; the binary never re-executes itself."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # For `launch.local`.

from launch import local  # noqa: E402

LIBRARY = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD is only set on Linux")
def test_tcmalloc_env_decides_when_to_preload():
  base = {"PATH": "/bin"}
  assert local.tcmalloc_env(base, LIBRARY) == {"PATH": "/bin", "LD_PRELOAD": LIBRARY}
  assert base == {"PATH": "/bin"}  # A copy: the caller's environment is left as it is.
  assert local.tcmalloc_env(base, None) == base  # Not installed.
  assert local.tcmalloc_env({local.TCMALLOC_ENV: "0"}, LIBRARY) == {local.TCMALLOC_ENV: "0"}
  own = {"LD_PRELOAD": "/opt/libjemalloc.so.2"}
  assert local.tcmalloc_env(own, LIBRARY) == own  # A user's own preload is left alone.
  named = {local.TCMALLOC_ENV: "/opt/libtcmalloc.so"}
  assert local.tcmalloc_env(named, None)["LD_PRELOAD"] == "/opt/libtcmalloc.so"


def test_find_tcmalloc(tmp_path):
  assert local.find_tcmalloc([str(tmp_path)]) is None
  (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
  assert local.find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc.so.4")
  (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # The minimal one is preferred.
  assert local.find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc_minimal.so.4")


def test_the_binary_never_reexecutes_itself():
  main_source = (REPO / "rlhf_jax" / "main.py").read_text()
  assert "execv" not in main_source and "LD_PRELOAD" not in main_source
  assert not (REPO / "rlhf_jax" / "host_malloc.py").exists()


# A child that reports whether tcmalloc is mapped into it, its LD_PRELOAD and its arguments.
_PROBE = """
import os, sys
mapped = "tcmalloc" in open("/proc/self/maps").read()
print(f"mapped={mapped} preload={os.environ.get('LD_PRELOAD', '')!r} args={sys.argv[1:]}")
"""


def _launch_probe(tmp_path, capfd, **options) -> str:
  (tmp_path / "probe.py").write_text(_PROBE)
  before = dict(os.environ)
  status = local.launch(1, ["--flag=1", "x"], program=[sys.executable, str(tmp_path / "probe.py")],
                        **options)
  assert status == 0
  assert dict(os.environ) == before  # The launcher's own environment is unchanged.
  return capfd.readouterr().out.strip()


@pytest.mark.skipif(local.find_tcmalloc() is None or not LINUX,
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_launcher_preloads_tcmalloc_into_its_child_only(tmp_path, capfd, monkeypatch):
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  monkeypatch.delenv(local.TCMALLOC_ENV, raising=False)
  library = local.find_tcmalloc()
  assert "tcmalloc" not in pathlib.Path("/proc/self/maps").read_text()  # Not in the launcher.
  assert _launch_probe(tmp_path, capfd) == f"mapped=True preload={library!r} args=['--flag=1', 'x']"
  assert _launch_probe(tmp_path, capfd, tcmalloc=False) == "mapped=False preload='' args=['--flag=1', 'x']"
  monkeypatch.setenv(local.TCMALLOC_ENV, "0")
  assert _launch_probe(tmp_path, capfd) == "mapped=False preload='' args=['--flag=1', 'x']"


def test_launcher_command_line_runs_one_process(tmp_path):
  (tmp_path / "probe.py").write_text(_PROBE)
  # The default: one process, the binary's flags passed as they are, its status returned.
  result = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "--no-tcmalloc", "--",
                           "--phase=nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "--phase=nope: unknown phase" in result.stderr
