"""The distributed training loop both training steps share (:mod:`.loop`) and what makes a resume exact
(:mod:`.resume`)."""
