"""Ray actors: the trainer (one rank or a group), generators and the filter pool."""
