"""Host memory for CPU hosts: the block cache (jaxscale/block_cache.c) and when it is preloaded."""

import os
import subprocess
import sys

import pytest

from jaxscale.cpu import APPLIED, SWITCH, block_cache_library

MIB = 1 << 20

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux (glibc) only")

PROGRAM = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.realloc.restype = lib.malloc.restype = ctypes.c_void_p
lib.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
lib.free.argtypes = [ctypes.c_void_p]

def alloc(mib):
    p = ctypes.c_void_p()
    assert lib.posix_memalign(ctypes.byref(p), 64, int(mib * (1 << 20))) == 0
    return p.value

def mapped(p):
    spans = (line.split()[0].split("-") for line in open("/proc/self/maps"))
    return any(int(a, 16) <= p < int(b, 16) for a, b in spans)
"""


def run(script: str, *env: str) -> list[str]:
    lib = block_cache_library()
    if lib is None:
        pytest.skip("no C compiler to build the block cache")
    out = subprocess.run([sys.executable, "-c", PROGRAM + script, str(lib)], capture_output=True,
                         text=True, env=dict(e.split("=", 1) for e in env))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_freed_large_blocks_are_handed_out_again_for_requests_of_about_their_size():
    out = run("""
a = alloc(40); ctypes.memset(a, 7, 40 << 20); lib.free(a)
b = alloc(35)                      # 35 MiB fits the idle 40 MiB block
c = alloc(40)                      # b holds it: a new block
d = alloc(100); lib.free(d)
e = alloc(60)                      # 100 MiB is more than 1.25 x 60: not reused
small = alloc(1); lib.free(small)  # the C library's
print(a % (2 << 20), b == a, c != a, e not in (a, d), ctypes.string_at(b, 4) == bytes([7] * 4),
      small % (2 << 20) != 0)
q = lib.realloc(b, 10)             # leaves the cache; the contents move
print(ctypes.string_at(q, 4) == bytes([7] * 4), lib.malloc(38 << 20) == a)  # Eigen's way
""")
    assert out == ["0", "True", "True", "True", "True", "True", "True", "True"]


def test_idle_blocks_beyond_the_cap_go_back_to_the_system():
    out = run("""
a, b = alloc(40), alloc(48)
lib.free(a); lib.free(b)           # 88 MiB idle > 64: the largest (b) is unmapped
print(mapped(a), mapped(b), alloc(40) == a)
""", "JAXSCALE_BLOCK_CACHE_MB=64")
    assert out == ["True", "False", "True"]


def test_when_all_slots_hold_blocks_the_largest_idle_one_makes_room():
    out = run("""
held = [alloc(16) for _ in range(256)]   # every slot (mapped, never touched)
extra = alloc(16)                         # none left: the C library's
for p in held[:2]: lib.free(p)
big = alloc(64)                           # no idle block fits: one makes room
print(all(p % (2 << 20) == 0 for p in held), extra % (2 << 20) != 0, big % (2 << 20) == 0,
      sum(mapped(p) and not big <= p < big + (64 << 20) for p in held[:2]))
""", "JAXSCALE_BLOCK_CACHE_MB=100000")
    assert out == ["True", "True", "True", "1"]


def test_the_environment_builds_the_cache_once_and_does_without_it_when_no_compiler_works(
        tmp_path, monkeypatch):
    from jaxscale.cpu import host_memory_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "broken"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    env = host_memory_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=8"})
    assert "LD_PRELOAD" not in env and env[APPLIED] == "1"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    monkeypatch.delenv("CC")
    lib = block_cache_library()
    if lib is None:
        pytest.skip("no C compiler")
    assert lib.parent == tmp_path / "fresh" / "jaxscale" and lib.is_file()
    env = host_memory_env({"LD_PRELOAD": str(lib)})
    assert env["LD_PRELOAD"] == str(lib) and block_cache_library() == lib


STAND_IN = """
#include <stddef.h>
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
void *malloc(size_t n) { return __libc_malloc(n); }
void free(void *p) { __libc_free(p); }
"""


def command(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`jaxscale ARGS` in this environment without its host-memory settings, plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in (SWITCH, APPLIED, "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-m", "jaxscale.cli", *args], capture_output=True,
                          text=True, env={**base, **env}, timeout=300)


def test_with_another_allocator_preloaded_the_command_refuses_in_one_line(tmp_path):
    source = tmp_path / "allocator.c"
    source.write_text(STAND_IN)
    allocator = tmp_path / "liballocator.so"
    built = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(allocator), str(source)],
                           capture_output=True)
    if built.returncode != 0:
        pytest.skip("no C compiler to build a stand-in allocator")
    out = command("info", **{SWITCH: "1", "LD_PRELOAD": str(allocator)})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"jaxscale: error: {SWITCH}=1 preloads jaxscale's block cache, but LD_PRELOAD already holds "
        f"{allocator}; two allocators in one process abort it: unset LD_PRELOAD or {SWITCH}"]
    # without the switch the stand-in is left alone, and the command runs
    out = command("info", "--config.model.n_layers=1", LD_PRELOAD=str(allocator))
    assert out.returncode == 0 and "parameters" in out.stdout, out.stderr[-2000:]


def test_a_switch_that_is_neither_on_nor_off_is_refused():
    out = command("info", **{SWITCH: "yes"})
    assert (out.returncode, out.stderr.strip()) == (
        2, f"jaxscale: error: {SWITCH}='yes': set it to 1 (huge pages and the block cache) or 0")
