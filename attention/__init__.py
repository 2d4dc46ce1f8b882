"""Everything that changes what the model computes, in plain torch.

No node classes live here (those are in ``nodes/``), and nothing heavy is
imported at module level: ComfyUI imports the pack at start-up.
"""
