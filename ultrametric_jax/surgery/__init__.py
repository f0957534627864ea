"""The method: SurgeryConfig and its schedules, the router, the tree maths, the surgical
attention layer, injection into a model and route extraction. Knows nothing of files, meshes,
runs or commands."""
