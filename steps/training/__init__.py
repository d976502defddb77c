"""The distributed training loop both training steps share: the driver's side (:mod:`.loop`: ``fit``), what each
Ray Train worker runs (:mod:`.worker`: the one place that touches ``ray.train``), what differs between trainings
(:mod:`.task`: ``TrainTask``, ``TrainConfig``), and what makes a resume exact (:mod:`.resume`)."""
