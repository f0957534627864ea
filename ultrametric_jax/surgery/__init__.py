"""The method: SurgeryConfig and its schedules, the router, the tree maths, the surgical
attention layer, injection into a model and route extraction, the training objectives
(distillation, density budget) and the O(S^2)-memory soft tree mask. Knows nothing of files,
meshes, runs or commands."""
