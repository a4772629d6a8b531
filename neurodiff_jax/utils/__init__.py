"""Small helpers shared by every package: paths, device meshes, durable files, shared errors, run configs."""
