"""Device meshes, logical axis rules, placement, global batches, multi-host initialisation."""
