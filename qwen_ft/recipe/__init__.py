"""The fine-tuning recipe: the steps that build a run from a config, and the run itself."""
