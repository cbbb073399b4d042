"""Speed and memory of the mmfuse fusion types, as ratios against reference implementations."""
