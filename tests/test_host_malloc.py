"""host_malloc: the binary re-executes itself once with tcmalloc preloaded when it is installed,
never twice, and never over a user's own preload or their opt-out."""

import os
import subprocess
import sys

import pytest

from rlhf_jax import host_malloc

LIBRARY = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_tcmalloc_env_decides_when_to_preload():
  env = host_malloc.tcmalloc_env({"PATH": "/bin"}, LIBRARY)
  assert env == {"PATH": "/bin", "LD_PRELOAD": LIBRARY, host_malloc.ENV_SWITCH: LIBRARY}
  assert host_malloc.tcmalloc_env({"PATH": "/bin"}, None) is None  # Not installed.
  assert host_malloc.tcmalloc_env({host_malloc.ENV_SWITCH: "0"}, LIBRARY) is None  # Opted out.
  assert host_malloc.tcmalloc_env(env, LIBRARY) is None  # The re-executed process: done.
  assert host_malloc.tcmalloc_env({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, LIBRARY) is None


def test_find_tcmalloc(tmp_path):
  assert host_malloc.find_tcmalloc([str(tmp_path)]) is None
  (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
  assert host_malloc.find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc.so.4")
  (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # The minimal one is preferred.
  assert host_malloc.find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc_minimal.so.4")


# A module that starts the way the binary does, then reports whether tcmalloc is mapped into it.
_PROBE = """
import sys
from rlhf_jax import host_malloc
host_malloc.reexec_with_tcmalloc(sys.argv, module="probe")
mapped = "tcmalloc" in open("/proc/self/maps").read()
print(f"mapped={mapped} args={sys.argv[1:]}")
"""


def _probe(tmp_path, **env) -> str:
  (tmp_path / "probe.py").write_text(_PROBE)
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_malloc.ENV_SWITCH)}
  result = subprocess.run([sys.executable, "-m", "probe", "--flag=1", "x"], cwd=tmp_path,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip()


@pytest.mark.skipif(host_malloc.find_tcmalloc() is None or not sys.platform.startswith("linux"),
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_binary_start_preloads_tcmalloc_once(tmp_path):
  # One line: the process was replaced once (the first one printed nothing), arguments intact.
  assert _probe(tmp_path) == "mapped=True args=['--flag=1', 'x']"
  assert _probe(tmp_path, **{host_malloc.ENV_SWITCH: "0"}) == "mapped=False args=['--flag=1', 'x']"
