"""What a plan is made from besides the weights: the model's config.json, the TP config, and the rules
(architectures/*.json) that say how each family's tensors are cut."""
