"""Test-session setup that must run before jax initialises its backends."""
import os

# Eight virtual CPU devices, so that sharding tests can build real meshes without hardware.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
