"""Force 8 host devices before jax is imported, so the CPU emulates an 8-device mesh.

On a machine with accelerators the flag only affects the (unused) host platform: the same tests then
run on the real devices, and those needing more devices than present are skipped with the reason.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
