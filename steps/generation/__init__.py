"""Drawing images from trained models (:mod:`.generator`) and classifier-based rejection (:mod:`.rejection`):
what the sample step and the served generator share."""
