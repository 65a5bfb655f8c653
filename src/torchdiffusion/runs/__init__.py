"""L5 runs: config and presets, building objects from a config, run folders, generation to files."""

